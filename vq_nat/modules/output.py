"""The one named output structure shared by every discrete bottleneck in ``vq_nat.modules``."""
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch


@dataclass
class QuantizerOutput:
    """What every bottleneck returns (same call shape: ``out = bottleneck(z_e, padding_mask=None)``).

    quantized:  (..., dim) forward value z_q, gradient straight-through to z_e (where the method has one).
    codes:      discrete codes. Hard assignment: (...) long (``(..., num_blocks)`` with product
                quantization); soft EM: (..., m) sampled indices (``(..., num_blocks, m)``).
    loss:       scalar auxiliary loss (commitment, codebook, KL...), mean over non-padding positions.
    perplexity: scalar, exp(entropy) of the code-usage distribution over the non-padding positions of
                this batch (averaged over blocks).
    codes_used: scalar, fraction of the codes used at least once in this batch (averaged over blocks).
    posterior_entropy: scalar or None, mean entropy (nats) of the E-step posterior q(code | z_e) over the
                non-padding positions (VQ bottlenecks: softmax(-||z_e - e_j||^2 / T); 0 when it is one-hot,
                where soft EM draws the same code m times and is hard EM).
    information: scalar or None, I(position; code) in nats over the non-padding positions of this batch:
                H(mean posterior) - mean H(posterior) (VQ bottlenecks, of the same posterior as
                posterior_entropy, also for hard EM; averaged over blocks). log(perplexity) when the posterior
                is one-hot; near 0 when every position has the same posterior, however many codes that spreads
                over (collapse that code perplexity does not show).
    targets:    (property) (..., num_codes) float distribution over codes (``(..., num_blocks, num_codes)`` with
                product quantization): one-hot for hard assignment, average of the m one-hots for soft EM. Built
                by ``make_targets`` on first access only (an image autoencoder never reads it, and at N positions
                x K codes it would be the largest tensor of the step).
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    perplexity: torch.Tensor
    codes_used: torch.Tensor
    make_targets: Callable[[], torch.Tensor] = field(repr=False)
    posterior_entropy: Optional[torch.Tensor] = None
    information: Optional[torch.Tensor] = None

    @functools.cached_property
    def targets(self) -> torch.Tensor:
        return self.make_targets()


def distinct_samples(codes: torch.Tensor) -> torch.Tensor:
    """Number of distinct codes among each position's m soft-EM samples, (...) float: ``codes`` (..., m) as in
    ``QuantizerOutput.codes`` of soft EM (``(..., num_blocks, m)`` with product quantization: averaged over the
    blocks). 1 everywhere means the m samples are one code, i.e. soft EM behaves as hard EM."""
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex() or codes.dim() == 0:
        what = (f"{codes.dtype} of shape {tuple(codes.shape)}" if isinstance(codes, torch.Tensor)
                else type(codes).__name__)
        raise TypeError(f"distinct_samples: codes must be an integer tensor (..., m) of sampled code indices, got "
                        f"{what}")
    drawn = codes.sort(-1).values
    return 1.0 + (drawn[..., 1:] != drawn[..., :-1]).sum(-1).float()


def code_perplexity(usage: torch.Tensor) -> torch.Tensor:
    """exp(-sum_k p_k log p_k) of the code histogram ``usage`` (..., K) (counts or weights), p = usage / sum:
    K when every code is used equally, 1 when one code takes everything. Over the last dimension."""
    p = usage / usage.sum(-1, keepdim=True).clamp(min=1e-12)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum(-1))


def usage_stats(codes: torch.Tensor, weight: torch.Tensor, num_codes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Perplexity exp(-sum_k p_k log p_k) of the code histogram p over weighted positions, and fraction used.

    ``codes``: (N,) long, ``weight``: (N,) float (0 for padding). No host sync (index_add, no boolean indexing).
    """
    usage = torch.zeros(num_codes, device=codes.device).index_add_(0, codes, weight)
    return code_perplexity(usage), (usage > 0).float().mean()
