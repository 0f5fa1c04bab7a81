"""Denoising noise for the autoencoder's input (Roy et al. 2018 App. C, after Lample et al. 2018 §2.3).

Word dropout replaces a token by ``unk`` with probability p (the length is kept, so the latent length, which is
tied to the target length, does not change). Word shuffle applies Lample et al.'s local permutation
(token i moves to the sorted position of i + U(0, k+1), so no token moves more than k places) to a sentence
with probability p. Only real tokens move; padding and the final EOS stay. Plain PyTorch.
"""
from typing import Optional

import torch

from .checks import as_padding_mask, check_float, check_int


def _checked(owner: str, tokens: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """Checks ``tokens`` (B, T) integer and ``p``; returns ``mask`` as bool (True = may be noised)."""
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise TypeError(f"{owner}: tokens must be an integer tensor of token indices, got "
                        f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
    if tokens.dim() != 2:
        raise ValueError(f"{owner}: tokens must be (B, T), got shape {tuple(tokens.shape)}")
    check_float(owner, "p", p, 0.0, 1.0)
    return as_padding_mask(owner, mask, tokens.shape, tokens.device, name="mask", meaning="True = may be noised")


def word_dropout(tokens: torch.Tensor, mask: torch.Tensor, p: float, unk: int,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``tokens`` (B, T) long; ``mask`` (B, T) bool (or 0/1), True where a token may be noised."""
    mask = _checked("word_dropout", tokens, mask, p)
    check_int("word_dropout", "unk", unk, 0)
    if p <= 0:
        return tokens
    drop = (torch.rand(tokens.shape, generator=generator, device=tokens.device) < p) & mask
    return tokens.masked_fill(drop, unk)


def word_shuffle(tokens: torch.Tensor, mask: torch.Tensor, p: float, k: int = 3,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Local shuffle (max displacement ``k``) of the masked positions of a fraction ``p`` of the sentences.

    ``mask`` must be a prefix of each row (the real tokens before EOS of a right-padded batch).
    """
    mask = _checked("word_shuffle", tokens, mask, p)
    check_int("word_shuffle", "k", k, 0)
    if p <= 0 or k <= 0:
        return tokens
    b, t = tokens.shape
    pos = torch.arange(t, device=tokens.device, dtype=torch.float).expand(b, t)
    chosen = torch.rand(b, 1, generator=generator, device=tokens.device) < p
    noise = torch.rand(b, t, generator=generator, device=tokens.device) * (k + 1)
    keys = torch.where(mask, pos + noise * chosen, torch.full_like(pos, float("inf")))
    # masked (prefix) positions are permuted among themselves; the rest keep their order and place
    order = keys.argsort(dim=1, stable=True)
    return torch.gather(tokens, 1, order)
