"""Length compression and decompression of the Latent Transformer's autoencoder (Kaiser et al. 2018 §3).

Follows tensor2tensor ``transformer_nat.compress`` / ``decompress_step``: residual convolution blocks, then
``nc`` strided convolutions (kernel 2, stride 2) that each halve the length, so a target of length n becomes
n / 2^nc latents; decompression doubles the length ``nc`` times by a 1x1 convolution to 2H channels followed by
a depth-to-space reshape (channels [0:H] -> position 2t, [H:2H] -> position 2t+1), i.e. a transposed
convolution with kernel 2 and stride 2.

Tensors are batch-first ``(B, T, H)``; ``padding_mask`` is ``(B, T)`` bool, True = padding. Padded positions are
zeroed after every layer, so a sentence's result does not depend on how much padding its batch has (batching
invariance). Plain PyTorch: no fairseq import.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import as_padding_mask, check_features, check_float, check_int


def _check_options(owner: str, dim: int, num_compress_steps: int, kernel_size: int, dropout: float) -> None:
    check_int(owner, "dim", dim, 1)
    check_int(owner, "num_compress_steps", num_compress_steps, 0)
    check_int(owner, "kernel_size", kernel_size, 1)
    if kernel_size % 2 == 0:  # padding k // 2 keeps the length only for an odd kernel
        raise ValueError(f"{owner}: kernel_size must be odd (padding kernel_size // 2 keeps the length), got "
                         f"{kernel_size}")
    check_float(owner, "dropout", dropout, 0.0, 1.0, high_open=True)


def _checked(module: nn.Module, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Checks batch-first ``x`` (B, T, H) and returns ``padding_mask`` (B, T) as bool (True = padding) or None."""
    owner = type(module).__name__
    check_features(owner, module, x, module.dim, name="x")
    if x.dim() != 3:
        raise ValueError(f"{owner}: x must be batch-first (B, T, {module.dim}), got shape {tuple(x.shape)}")
    return as_padding_mask(owner, padding_mask, x.shape[:2], x.device)


def _zero_pad(x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    return x if padding_mask is None else x.masked_fill(padding_mask.unsqueeze(-1), 0.0)


def downsample_mask(padding_mask: Optional[torch.Tensor], steps: int) -> Optional[torch.Tensor]:
    """Padding mask after ``steps`` halvings: a compressed position is real if any of its inputs is."""
    if padding_mask is None:
        return None
    b, t = padding_mask.shape
    return padding_mask.view(b, t >> steps, 1 << steps).all(-1)


def upsample_mask(padding_mask: Optional[torch.Tensor], steps: int) -> Optional[torch.Tensor]:
    if padding_mask is None:
        return None
    return padding_mask.repeat_interleave(1 << steps, dim=1)


def conv_btc(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """``conv`` (no dilation or groups, zero padding) applied to batch-first ``x`` (B, T, C_in) -> (B, T', C_out):
    ``conv(x.transpose(1, 2))`` transposed back, computed as a 2-D convolution in channels-last layout, whose
    (B, C, 1, T) view of ``x`` is ``x`` itself and whose output is (B, T', C) contiguous (no transposed copies)."""
    (s,), (p,) = conv.stride, conv.padding
    weight = conv.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)  # (C_out, C_in, 1, k)
    out = F.conv2d(x.unsqueeze(1).permute(0, 3, 1, 2), weight, conv.bias, stride=(1, s), padding=(0, p))
    return out.permute(0, 2, 3, 1).flatten(1, 2)  # (B, 1, T', C_out) -> (B, T', C_out)


class ResidualConvBlock(nn.Module):
    """t2t ``residual_conv``: x + Dropout([ReLU -> Conv(k) -> LayerNorm] x 3 applied to LayerNorm(x))."""

    def __init__(self, dim: int, kernel_size: int = 3, layers: int = 3, dropout: float = 0.1):
        super().__init__()
        _check_options(type(self).__name__, dim, 0, kernel_size, dropout)
        check_int(type(self).__name__, "layers", layers, 1)
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.convs = nn.ModuleList(
            nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2) for _ in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        padding_mask = _checked(self, x, padding_mask)
        if x.size(1) == 0:
            return x.clone()
        y = _zero_pad(self.norm(x), padding_mask)
        for conv, norm in zip(self.convs, self.norms):
            y = _zero_pad(norm(conv_btc(torch.relu(y), conv)), padding_mask)
        return _zero_pad(x + self.dropout(y), padding_mask)


def _residual_stack(module: nn.Module, dim: int, steps: int, kernel_size: int, dropout: float, blocks: int) -> None:
    """The checked options and the residual blocks that the Compressor and the Decompressor share."""
    _check_options(type(module).__name__, dim, steps, kernel_size, dropout)
    module.dim, module.steps = dim, steps
    module.residual = nn.ModuleList(ResidualConvBlock(dim, kernel_size, dropout=dropout) for _ in range(blocks))


class Compressor(nn.Module):
    """Target embeddings (B, T, H) -> (B, T / 2^nc, H): ``nc`` residual blocks, then ``nc`` stride-2 convolutions.

    T must be a multiple of 2^nc (the model pads the target to one).
    """

    def __init__(self, dim: int, num_compress_steps: int, kernel_size: int = 3, dropout: float = 0.1):
        super().__init__()
        _residual_stack(self, dim, num_compress_steps, kernel_size, dropout, blocks=max(num_compress_steps, 1))
        self.strided = nn.ModuleList(nn.Conv1d(dim, dim, 2, stride=2) for _ in range(num_compress_steps))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_compress_steps))

    def forward(
        self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        padding_mask = _checked(self, x, padding_mask)
        if x.size(1) % (1 << self.steps) != 0:
            raise ValueError(f"Compressor: length {x.size(1)} is not a multiple of 2^nc = {1 << self.steps}; pad the "
                             f"input to a multiple of {1 << self.steps}")
        if x.size(1) == 0:  # nothing to compress: an empty (B, 0, H)
            return x.clone(), padding_mask
        x = _zero_pad(x, padding_mask)
        for block in self.residual:
            x = block(x, padding_mask)
        for i, (conv, norm) in enumerate(zip(self.strided, self.norms)):
            padding_mask = downsample_mask(padding_mask, 1)
            # ReLU -> Conv(kernel 2, stride 2, no bias) -> LayerNorm, as t2t ``conv_block``
            x = _zero_pad(norm(conv_btc(torch.relu(x), conv)), padding_mask)
        return x, padding_mask


class Decompressor(nn.Module):
    """Latents (B, L, H) -> (B, L * 2^nc, H): ``nc`` x [residual block, 1x1 conv H -> 2H, depth-to-space]."""

    def __init__(self, dim: int, num_compress_steps: int, kernel_size: int = 3, dropout: float = 0.1):
        super().__init__()
        _residual_stack(self, dim, num_compress_steps, kernel_size, dropout, blocks=num_compress_steps)
        self.thicken = nn.ModuleList(nn.Linear(dim, 2 * dim) for _ in range(num_compress_steps))
        self.norms = nn.ModuleList(nn.LayerNorm(2 * dim) for _ in range(num_compress_steps))

    def forward(
        self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns the decompressed (B, L * 2^nc, H) and its padding mask (None when nothing is padded)."""
        padding_mask = _checked(self, x, padding_mask)
        if x.size(1) == 0:  # no latents: an empty (B, 0, H)
            return x.clone(), None
        if padding_mask is not None and not bool(padding_mask.any()):
            padding_mask = None  # nothing to zero after every layer (decoding one sentence)
        for i, (block, lin, norm) in enumerate(zip(self.residual, self.thicken, self.norms)):
            x = block(x, padding_mask)
            h = x if i == 0 else torch.relu(x)  # t2t: no leading ReLU on the first step
            h = norm(lin(h))  # (B, L, 2H)
            b, length, two_h = h.shape
            x = h.reshape(b, 2 * length, two_h // 2)  # depth-to-space
            padding_mask = upsample_mask(padding_mask, 1)
            x = _zero_pad(x, padding_mask)
        return x, padding_mask
