"""Gumbel-Softmax discrete bottleneck (Jang et al. 2016; Maddison et al. 2016), the baseline of Roy et al. 2018 §4.

Follows tensor2tensor ``layers/discretization.py``: ``gumbel_sample``, ``gumbel_softmax`` and the
``"gumbel-softmax"`` branch of ``discrete_bottleneck`` (logits ``dense(x, 2**z_size)``, back to the hidden size
by ``dense(hot, hidden_size)``), with ``common_layers.inverse_lin_decay`` / ``inverse_exp_decay`` schedules.

Also holds ``checked_input``, shared with ``semhash.py``. Plain PyTorch: no fairseq import.
"""
import logging
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import as_padding_mask, check_codes, check_features, check_float, check_int
from .output import QuantizerOutput, usage_stats
from .schedules import inverse_exp_decay, inverse_lin_decay

logger = logging.getLogger(__name__)


def checked_input(module: nn.Module, z_e: torch.Tensor, padding_mask: Optional[torch.Tensor]):
    """The checked ``z_e`` as (N, dim) rows and the (N,) float weight of each: 1 for real positions, 0 for padding
    (``padding_mask`` True or 1 = padding, of any dtype; see :func:`checks.as_padding_mask`)."""
    owner = type(module).__name__
    check_features(owner, module, z_e, module.dim)
    lead = z_e.shape[:-1]
    mask = as_padding_mask(owner, padding_mask, lead, z_e.device)
    rows = z_e.reshape(lead.numel(), module.dim)
    weight = torch.ones(lead.numel(), device=z_e.device) if mask is None else (~mask.reshape(-1)).float()
    finite = torch.isfinite(rows).all(-1)
    if not bool(finite.all()):
        padded = ~finite & ~weight.bool()
        if bool(padded.any()):  # whatever padding holds never reaches a loss or a statistic
            rows = rows.masked_fill(padded.unsqueeze(-1), 0.0)
        bad = int((~finite & weight.bool()).sum())
        if bad:  # real NaN/inf stay NaN in z_q and the loss (for fairseq to see); their codes mean nothing
            logger.warning("%s: %d non-finite encoder outputs: their codes are meaningless and left out of the "
                           "code statistics", owner, bad)
            weight = weight * finite.float()
    return rows, weight


def gumbel_sample(shape, device=None) -> torch.Tensor:
    """t2t ``gumbel_sample``: g = -log(-log u), u ~ U(0.00001, 0.99998) (clipped against overflow)."""
    u = torch.empty(shape, device=device).uniform_(0.00001, 0.99998)
    return -torch.log(-torch.log(u))


class GumbelSoftmaxQuantizer(nn.Module):
    """Gumbel-Softmax bottleneck: ``z_e -> logits -> (straight-through) one-hot sample -> dense back to dim``.

    Defaults are t2t's (``gumbel_softmax`` with ``kl_warmup_steps=150000``): temperature
    ``1.2 - inverse_lin_decay(150000)`` i.e. 1.19 -> 0.2 linearly, Gumbel noise scaled by
    ``0.5 * inverse_exp_decay(150000 // 5)``, 10% of the training steps a temperature ~ U(0.5, 1),
    loss ``5.0 * d_dev + 0.002 * mean(-max_k log q_k)``.

    Args:
        num_codes: K (t2t: 2**z_size).
        dim: size of z_e's last dimension (and of the output).
        temperature_start, temperature_min, anneal_steps: tau(step) = start - (start - min) * min(step / anneal, 1).
        kl_weight: weight of t2t's "kl" term mean_t(-max_k log q(k|x_t)) (0.002 in t2t).
        diversity_weight: weight of t2t's ``d_dev`` (minus the batch variance of the argmax log-probs, 5.0 in t2t).
        hard: forward a one-hot (straight-through, gradient of the soft sample); False = forward the soft
            sample as t2t does in training (t2t's later ``do_hard_gumbel_softmax`` flag).
        noise_scale: final multiplier of the Gumbel noise (0.5 in t2t; 1 = textbook Gumbel-Softmax).
        noise_warmup_steps: the noise multiplier is ``noise_scale * inverse_exp_decay(noise_warmup_steps)``;
            None = ``anneal_steps // 5`` (t2t), 0 = no warm-up.
        random_temperature_prob: probability (per forward) of using tau ~ U(0.5, 1) instead (0.1 in t2t).
    """

    def __init__(self, num_codes: int, dim: int, temperature_start: float = 1.19, temperature_min: float = 0.2,
                 anneal_steps: int = 150000, kl_weight: float = 0.002, diversity_weight: float = 5.0,
                 hard: bool = True, noise_scale: float = 0.5, noise_warmup_steps: Optional[int] = None,
                 random_temperature_prob: float = 0.1):
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "num_codes", num_codes, 2)
        check_int(owner, "dim", dim, 1)
        check_float(owner, "temperature_start", temperature_start, 0.0, low_open=True)
        check_float(owner, "temperature_min", temperature_min, 0.0, temperature_start, low_open=True)  # anneals down
        check_int(owner, "anneal_steps", anneal_steps, 0)
        check_float(owner, "kl_weight", kl_weight, 0.0)
        check_float(owner, "diversity_weight", diversity_weight, 0.0)
        check_float(owner, "noise_scale", noise_scale, 0.0)
        if noise_warmup_steps is not None:
            check_int(owner, "noise_warmup_steps", noise_warmup_steps, 0)
        check_float(owner, "random_temperature_prob", random_temperature_prob, 0.0, 1.0)
        self.num_codes = num_codes
        self.dim = dim
        self.temperature_start = temperature_start
        self.temperature_min = temperature_min
        self.anneal_steps = anneal_steps
        self.kl_weight = kl_weight
        self.diversity_weight = diversity_weight
        self.hard = hard
        self.noise_scale = noise_scale
        self.noise_warmup_steps = anneal_steps // 5 if noise_warmup_steps is None else noise_warmup_steps
        self.random_temperature_prob = random_temperature_prob
        self.to_logits = nn.Linear(dim, num_codes)  # t2t dense "mask"
        self.from_codes = nn.Linear(num_codes, dim)  # t2t dense "dae_dense"
        for lin in (self.to_logits, self.from_codes):  # tf.layers.dense defaults: glorot uniform, zero bias
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def set_num_updates(self, num_updates: int) -> None:
        if int(num_updates) < 0:
            raise ValueError(f"GumbelSoftmaxQuantizer: num_updates must be >= 0, got {num_updates}")
        self.num_updates.fill_(int(num_updates))

    def temperature(self, step: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tau(step) = T0 - (T0 - Tmin) * min(step / anneal_steps, 1)  (t2t: 1.2 - inverse_lin_decay(steps))."""
        step = self.num_updates.float() if step is None else torch.as_tensor(step, dtype=torch.float)
        progress = inverse_lin_decay(self.anneal_steps, step, min_value=0.0)
        return self.temperature_start - (self.temperature_start - self.temperature_min) * progress

    def noise_multiplier(self, step: Optional[torch.Tensor] = None) -> torch.Tensor:
        """t2t: gumbel_samples *= inverse_exp_decay(steps // 5) * 0.5."""
        step = self.num_updates.float() if step is None else torch.as_tensor(step, dtype=torch.float)
        return self.noise_scale * inverse_exp_decay(self.noise_warmup_steps, step)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices (...) -> (..., dim): dense(one_hot(codes)) (t2t ``embed``, "gumbel-softmax")."""
        check_codes(type(self).__name__, codes, self.num_codes, self.from_codes.weight.device)
        return F.embedding(codes, self.from_codes.weight.t()) + self.from_codes.bias

    def forward(self, z_e: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> QuantizerOutput:
        rows, weight = checked_input(self, z_e, padding_mask)  # (N, dim), (N,)
        lead, k = z_e.shape[:-1], self.num_codes
        num_valid = weight.sum().clamp(min=1.0)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            x = rows.float()
            logits = F.linear(x, self.to_logits.weight.float(), self.to_logits.bias.float())
            logq = F.log_softmax(logits, dim=-1)  # (N, K)
            argmax = logq.argmax(-1)

            if self.training:
                # s = softmax((log q + c * g) / tau), g ~ Gumbel(0, 1)   (t2t gumbel_softmax)
                noise = gumbel_sample(logq.shape, device=logq.device) * self.noise_multiplier().to(logq.device)
                tau = self.temperature().to(logq.device)
                if self.random_temperature_prob > 0:
                    # "10% of the time keep reasonably high temperature to keep learning"
                    hot_tau = torch.empty((), device=logq.device).uniform_(0.5, 1.0)
                    tau = torch.where(torch.rand((), device=logq.device) < self.random_temperature_prob, hot_tau, tau)
                soft = torch.softmax((logq + noise) / tau, dim=-1)
                codes = soft.argmax(-1)  # t2t: c = argmax(hot)
                one_hot = F.one_hot(codes, k).float()
                # straight-through: forward one_hot, backward d soft
                sample = one_hot + soft - soft.detach() if self.hard else soft
            else:
                codes = argmax  # eval: no noise, "just hot @eval"
                one_hot = F.one_hot(codes, k).float()
                sample = one_hot
            z_q = F.linear(sample, self.from_codes.weight.float(), self.from_codes.bias.float())

            # t2t "kl" = -max_k log q(k|x), mean over non-padding positions
            neg_max_logq = ((-logq.max(-1).values) * weight).sum() / num_valid
            # t2t d_dev = -mean_k Var_t[log q(k|x_t) * 1{k = argmax_j q(j|x_t)}] ("prevent too few being used")
            distrib = logq * F.one_hot(argmax, k).float()
            w = weight.unsqueeze(-1)
            d_mean = (distrib * w).sum(0, keepdim=True) / num_valid
            d_dev = -(((distrib - d_mean) ** 2) * w).sum(0).div(num_valid).mean()
            loss = self.diversity_weight * d_dev + self.kl_weight * neg_max_logq

            perplexity, codes_used = usage_stats(codes, weight, k)
        return QuantizerOutput(
            quantized=z_q.to(z_e.dtype).reshape(*lead, self.dim),
            codes=codes.reshape(lead),
            make_targets=lambda: one_hot.reshape(*lead, k),
            loss=loss,
            perplexity=perplexity,
            codes_used=codes_used,
        )

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, temperature={self.temperature_start}->"
            f"{self.temperature_min} over {self.anneal_steps} updates, hard={self.hard}"
        )
