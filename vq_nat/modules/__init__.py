"""Discrete bottlenecks in plain PyTorch (no fairseq): VQ-VAE with hard/soft EM and the paper's alternatives.

Every bottleneck is called as ``out = bottleneck(z_e, padding_mask=None)`` and returns a
:class:`QuantizerOutput` (quantized, codes, targets, loss, perplexity, codes_used), and maps codes back to
vectors with ``bottleneck.embed_codes(codes)``.
"""
from .gumbel import GumbelSoftmaxQuantizer
from .output import QuantizerOutput, distinct_samples
from .semhash import SemanticHashingQuantizer
from .vector_quantizer import VectorQuantizer

__all__ = ["GumbelSoftmaxQuantizer", "QuantizerOutput", "SemanticHashingQuantizer", "VectorQuantizer", "distinct_samples"]
