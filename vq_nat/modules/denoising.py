"""Denoising noise for the autoencoder's input (Roy et al. 2018 App. C, after Lample et al. 2018 §2.3).

Word dropout replaces a token by ``unk`` with probability p (the length is kept, so the latent length, which is
tied to the target length, does not change). Word shuffle applies Lample et al.'s local permutation
(token i moves to the sorted position of i + U(0, k+1), so no token moves more than k places) to a sentence
with probability p. Only real tokens move; padding and the final EOS stay. Plain PyTorch.
"""
from typing import Optional

import torch


def word_dropout(tokens: torch.Tensor, mask: torch.Tensor, p: float, unk: int,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``tokens`` (B, T) long; ``mask`` (B, T) bool, True where a token may be noised."""
    if p <= 0:
        return tokens
    drop = (torch.rand(tokens.shape, generator=generator, device=tokens.device) < p) & mask
    return tokens.masked_fill(drop, unk)


def word_shuffle(tokens: torch.Tensor, mask: torch.Tensor, p: float, k: int = 3,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Local shuffle (max displacement ``k``) of the masked positions of a fraction ``p`` of the sentences.

    ``mask`` must be a prefix of each row (the real tokens before EOS of a right-padded batch).
    """
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
