"""Discrete bottlenecks in plain PyTorch (no fairseq): VQ-VAE with hard/soft EM and the paper's alternatives.

Every bottleneck is called as ``out = bottleneck(z_e, padding_mask=None)`` and returns a
:class:`QuantizerOutput` (quantized, codes, targets, loss, perplexity, codes_used), and maps codes back to
vectors with ``bottleneck.embed_codes(codes)``. ``z_e`` is a floating-point (..., dim) tensor on the module's
device (an empty batch gives empty outputs and a zero loss); ``padding_mask`` has z_e's shape without its last
dimension, True or 1 = padding (bool, integer, or float holding only 0 and 1). Anything else, and any option out of
its range, is a TypeError / ValueError that names it (:mod:`.checks`).
"""
from .gumbel import GumbelSoftmaxQuantizer
from .output import QuantizerOutput, distinct_samples
from .semhash import SemanticHashingQuantizer
from .vector_quantizer import VectorQuantizer

__all__ = ["GumbelSoftmaxQuantizer", "QuantizerOutput", "SemanticHashingQuantizer", "VectorQuantizer", "distinct_samples"]
