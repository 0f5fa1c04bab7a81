"""The one named output structure shared by every discrete bottleneck in ``vq_nat.modules``."""
from typing import NamedTuple

import torch


class QuantizerOutput(NamedTuple):
    """What every bottleneck returns (same call shape: ``out = bottleneck(z_e, padding_mask=None)``).

    quantized:  (..., dim) forward value z_q, gradient straight-through to z_e (where the method has one).
    codes:      discrete codes. Hard assignment: (...) long (``(..., num_blocks)`` with product
                quantization); soft EM: (..., m) sampled indices (``(..., num_blocks, m)``).
    targets:    (..., num_codes) float distribution over codes (``(..., num_blocks, num_codes)`` with
                product quantization): one-hot for hard assignment, average of the m one-hots for soft EM.
                It is the latent predictor's training target.
    loss:       scalar auxiliary loss (commitment, codebook, KL...), mean over non-padding positions.
    perplexity: scalar, exp(entropy) of the code-usage distribution over the non-padding positions of
                this batch (averaged over blocks).
    codes_used: scalar, fraction of the codes used at least once in this batch (averaged over blocks).
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    targets: torch.Tensor
    loss: torch.Tensor
    perplexity: torch.Tensor
    codes_used: torch.Tensor
