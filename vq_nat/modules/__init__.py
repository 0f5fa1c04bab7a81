"""Discrete bottlenecks in plain PyTorch (no fairseq): VQ-VAE with hard/soft EM and the paper's alternatives.

Every bottleneck is called as ``out = bottleneck(z_e, padding_mask=None)`` and returns a
:class:`QuantizerOutput` (quantized, codes, targets, loss, perplexity, codes_used).
"""
from .output import QuantizerOutput
from .vector_quantizer import VectorQuantizer

__all__ = ["QuantizerOutput", "VectorQuantizer"]
