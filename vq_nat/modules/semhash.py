"""Improved semantic hashing bottleneck (Kaiser & Bengio 2018, arXiv 1801.09797), a baseline of Roy et al. 2018.

Follows the ``"semhash"`` branch of tensor2tensor ``layers/discretization.discrete_bottleneck`` with
``common_layers.saturating_sigmoid``, ``inverse_exp_decay`` and ``bit_to_int``; defaults are the
``transformer_ae_*`` hparams of t2t's ``transformer_vae.py`` (noise_dev=0.5, d_mix=0.5, startup_steps=10000).
Plain PyTorch: no fairseq import.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_codes, check_float, check_int
from .gumbel import checked_input
from .output import QuantizerOutput, usage_stats
from .schedules import inverse_exp_decay


def saturating_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """t2t ``common_layers.saturating_sigmoid``: max(0, min(1, 1.2 * sigmoid(x) - 0.1))."""
    return torch.clamp(1.2 * torch.sigmoid(x) - 0.1, 0.0, 1.0)


class SemanticHashingQuantizer(nn.Module):
    """``z_e -> num_bits bits -> dim``; code = integer of the bits (lower-endian), ``num_codes = 2**num_bits``.

    Args:
        num_bits: z_size, number of bits (the paper's tables use 2**12-code latents).
        dim: size of z_e's last dimension (and of the output).
        noise_std: std of the truncated (at 2 std) Gaussian noise added before the saturating sigmoid in
            training (t2t ``noise_dev``; 0.5 in the transformer_ae hparams, 1.0 in discrete_bottleneck's default).
        startup_steps: the probability of feeding the discrete bits ramps as
            ``discrete_mix * inverse_exp_decay(2 * startup_steps)`` (10000 in the transformer_ae hparams).
        discrete_mix: final probability of the discrete (vs. soft) bits in training (t2t ``d_mix`` = 0.5).
    """

    def __init__(
        self, num_bits: int, dim: int, noise_std: float = 0.5, startup_steps: int = 10000, discrete_mix: float = 0.5
    ):
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "num_bits (targets are 2**num_bits wide)", num_bits, 1, 30)
        check_int(owner, "dim", dim, 1)
        check_float(owner, "noise_std", noise_std, 0.0)
        check_int(owner, "startup_steps", startup_steps, 0)
        check_float(owner, "discrete_mix", discrete_mix, 0.0, 1.0)
        self.num_bits = num_bits
        self.num_codes = 2**num_bits
        self.dim = dim
        self.noise_std = noise_std
        self.startup_steps = startup_steps
        self.discrete_mix = discrete_mix
        self.to_bits = nn.Linear(dim, num_bits)  # t2t dense "vcc"
        # t2t: h1 = dense(c, name="vch1a") + dense(1 - c, name="vch1b"); one bias suffices for the sum
        self.from_bits = nn.Linear(num_bits, dim)
        self.from_inv_bits = nn.Linear(num_bits, dim, bias=False)
        for lin in (self.to_bits, self.from_bits, self.from_inv_bits):  # tf.layers.dense defaults
            nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(self.to_bits.bias)
        nn.init.zeros_(self.from_bits.bias)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("bit_values", 2 ** torch.arange(num_bits, dtype=torch.long), persistent=False)

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates.fill_(int(num_updates))

    def discrete_prob(self, step: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Training probability of the discrete bits: pd = discrete_mix * inverse_exp_decay(2 * startup_steps)."""
        step = self.num_updates.float() if step is None else torch.as_tensor(step, dtype=torch.float)
        return self.discrete_mix * inverse_exp_decay(2 * self.startup_steps, step)

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """t2t ``bit_to_int`` (lower-endian): code = sum_i bit_i * 2**i."""
        return (bits.long() * self.bit_values).sum(-1)

    def codes_to_bits(self, codes: torch.Tensor) -> torch.Tensor:
        """t2t ``int_to_bit``: bit_i = floor(code / 2**i) mod 2, as float (codes in [0, num_codes))."""
        check_codes(type(self).__name__, codes, self.num_codes, self.to_bits.weight.device)
        return ((codes.unsqueeze(-1) // self.bit_values) % 2).float()

    def _unbottleneck(self, c: torch.Tensor) -> torch.Tensor:
        """h = W_a c + W_b (1 - c) + b   (t2t h1a + h1b)."""
        w_a, w_b, b = self.from_bits.weight.float(), self.from_inv_bits.weight.float(), self.from_bits.bias.float()
        return F.linear(c, w_a, b) + F.linear(1.0 - c, w_b)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices (...) -> (..., dim) (t2t ``embed``, "semhash"): the eval-mode value for these bits."""
        return self._unbottleneck(self.codes_to_bits(codes))

    def forward(self, z_e: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> QuantizerOutput:
        rows, weight = checked_input(self, z_e, padding_mask)  # (N, dim), (N,)
        lead = z_e.shape[:-1]
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            x = rows.float()
            logits = F.linear(x, self.to_bits.weight.float(), self.to_bits.bias.float())  # (N, num_bits)
            if self.training and self.noise_std > 0:
                # y = saturating_sigmoid(c + n), n ~ TruncatedNormal(0, noise_dev) cut at 2 std (tf.truncated_normal)
                noise = torch.empty_like(logits)
                nn.init.trunc_normal_(noise, 0.0, self.noise_std, -2 * self.noise_std, 2 * self.noise_std)
                y = saturating_sigmoid(logits + noise)
            else:
                y = saturating_sigmoid(logits)
            # d = 1[y > 0.5]; straight-through: y_discrete = d + y - sg(y)
            bits = (y > 0.5).float()
            y_discrete = bits + y - y.detach()
            if self.training:
                # t2t: c = where(rand < pd, y_discrete, y), pd = d_mix * inverse_exp_decay(2 * startup_steps).
                # t2t draws one coin per batch row; here one per position (layout-agnostic).
                pd = self.discrete_prob().to(y.device)
                use_discrete = torch.rand(y.size(0), 1, device=y.device) < pd
                c = torch.where(use_discrete, y_discrete, y)
            else:
                c = y_discrete  # eval: pd = 1
            z_q = self._unbottleneck(c)

            codes = self.bits_to_codes(bits)  # t2t: bit_to_int(stop_gradient(d)), the (noisy in training) bits
            perplexity, codes_used = usage_stats(codes, weight, self.num_codes)
        return QuantizerOutput(
            quantized=z_q.to(z_e.dtype).reshape(*lead, self.dim),
            codes=codes.reshape(lead),
            # one-hot over 2**num_bits codes, built only when read (N x K: the largest tensor of the step)
            make_targets=lambda: F.one_hot(codes, self.num_codes).float().reshape(*lead, self.num_codes),
            loss=torch.zeros((), device=z_e.device),  # t2t semhash adds no auxiliary loss
            perplexity=perplexity,
            codes_used=codes_used,
        )

    def extra_repr(self) -> str:
        return (
            f"num_bits={self.num_bits}, dim={self.dim}, noise_std={self.noise_std}, "
            f"startup_steps={self.startup_steps}, discrete_mix={self.discrete_mix}"
        )
