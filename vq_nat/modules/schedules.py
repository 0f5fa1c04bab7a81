"""Warm-up schedules of tensor2tensor ``common_layers``, shared by the bottlenecks and the Latent Transformer's
decoder-input masking. ``step`` is a tensor (or a float: the result is then a 0-d tensor)."""
import torch


def inverse_lin_decay(max_step: float, step: torch.Tensor, min_value: float = 0.01) -> torch.Tensor:
    """t2t ``common_layers.inverse_lin_decay``: min_value + (1 - min_value) * min(step / max_step, 1)."""
    if max_step <= 0:
        return torch.ones_like(step)
    progress = torch.clamp(step / float(max_step), max=1.0)
    return progress * (1.0 - min_value) + min_value


def inverse_exp_decay(max_step: float, step: torch.Tensor, min_value: float = 0.01) -> torch.Tensor:
    """t2t ``common_layers.inverse_exp_decay``: min_value ** (max(max_step - step, 0) / max_step).

    Rises exponentially from ``min_value`` at step 0 to 1.0 at ``max_step`` (and stays 1 afterwards).
    """
    if max_step <= 0:
        return torch.ones_like(step)
    return min_value ** (torch.clamp(float(max_step) - step, min=0.0) / float(max_step))


def annealed_temperature(step: int, start: float, anneal_updates: int) -> float:
    """Soft EM's E-step temperature at update ``step``, annealed geometrically from ``start`` to the paper's 1:

    T(step) = start ** (1 - min(step / anneal_updates, 1)); constant ``start`` when anneal_updates <= 0.
    """
    if anneal_updates <= 0:
        return float(start)
    return float(start) ** (1.0 - min(step / anneal_updates, 1.0))
