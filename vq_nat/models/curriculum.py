"""The Latent Transformer's training curriculum, functions of the update number (t2t ``transformer_nat``): the
decoder-input masking warm-up and the gate of the latent-predictor loss (the bottleneck anneals its own soft-EM
temperature). ``Curriculum`` is a mixin of ``LatentDecoder`` that applies them at the current update."""
import torch

from ..modules.schedules import inverse_exp_decay, inverse_lin_decay


def masking_probability(step: int, mask_startup_steps: int) -> float:
    """Fraction of decoder inputs taken from the latents (the rest are gold embeddings), t2t ``transformer_nat``:

    masking = clip(inverse_lin_decay(M) * inverse_exp_decay(M // 4), 0, 1), with
    inverse_lin_decay(M) = 0.01 + 0.99 * min(step / M, 1) and inverse_exp_decay(M') = 0.01 ** (max(M' - step, 0) / M').
    """
    if mask_startup_steps <= 0:
        return 1.0
    step = torch.tensor(float(step))
    masking = inverse_lin_decay(mask_startup_steps, step) * inverse_exp_decay(max(mask_startup_steps // 4, 1), step)
    return float(masking.clamp(0.0, 1.0))


def latent_gate(step: int, latent_loss_start: int) -> float:
    """t2t gates the latent-predictor loss: it counts (1) iff step > latent_loss_start, else 0."""
    return 1.0 if step > latent_loss_start else 0.0


class Curriculum:
    """The schedules at ``self.num_updates`` (set by fairseq's ``set_num_updates`` every update)."""

    def set_num_updates(self, num_updates):  # the bottleneck keeps its own schedules (fairseq calls it too)
        self.num_updates = num_updates

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = state_dict.pop(prefix + "soft_em_temperature", None)  # where checkpoints kept it before
        if old is not None:
            state_dict.setdefault(prefix + "bottleneck.current_temperature", old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def masking(self) -> float:
        return masking_probability(self.num_updates, self.mask_startup_steps) if self.training else 1.0

    def latent_gate(self) -> float:
        """The latent-predictor (and length) loss's factor at this update: 0 until ``--latent-loss-start``, then 1."""
        return latent_gate(self.num_updates, self.latent_loss_start)
