"""Fixes for the fairseq build we install (``fairseq-fixed`` 0.12.3.1), applied when the plugin is imported.

1. ``data_utils.batch_by_size`` in that fork drops the last batch whenever its size is not a multiple of
   ``--required-batch-size-multiple`` (default 8): ``fairseq-generate --batch-size 16`` on 20 sentences
   translated only 16, and training silently skipped sentences. Upstream fairseq keeps that batch. We restore
   upstream behaviour by appending the dropped indices as a final batch, so nothing is lost.
"""
import numpy as np
from fairseq.data import data_utils

_original_batch_by_size = data_utils.batch_by_size


def batch_by_size(indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None, max_sentences=None,
                  required_batch_size_multiple=1, fixed_shapes=None):
    batches = _original_batch_by_size(
        indices, num_tokens_fn, num_tokens_vec=num_tokens_vec, max_tokens=max_tokens,
        max_sentences=max_sentences, required_batch_size_multiple=required_batch_size_multiple,
        fixed_shapes=fixed_shapes,
    )
    indices = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices), dtype=np.int64)
    kept = sum(len(b) for b in batches)
    if kept < len(indices):
        seen = np.concatenate(batches) if len(batches) else np.zeros(0, dtype=np.int64)
        missing = indices[~np.isin(indices, seen)]
        batches = list(batches) + [missing]
    return batches


if not getattr(data_utils.batch_by_size, "_vq_nat_patched", False):
    batch_by_size._vq_nat_patched = True
    data_utils.batch_by_size = batch_by_size
