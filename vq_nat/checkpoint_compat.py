"""Let torch >= 2.6 load fairseq checkpoints, whose default ``torch.load`` is weights-only.

fairseq 0.12 calls ``torch.load(f, map_location=...)`` without ``weights_only``; torch >= 2.6 then refuses
the Python objects a fairseq checkpoint holds (``argparse.Namespace`` from older checkpoints, numpy scalars
in the saved meters, omegaconf containers, ...). We allow exactly those types with
``torch.serialization.add_safe_globals`` when the plugin is imported: no weights-only bypass.
"""
import argparse
import collections

import numpy as np
import torch

_SAFE = [argparse.Namespace, collections.OrderedDict, collections.defaultdict]
try:  # numpy scalars/arrays as pickled by fairseq's meters and best-checkpoint values
    import numpy._core.multiarray as _ma  # numpy >= 2
except ImportError:
    import numpy.core.multiarray as _ma
_SAFE += [_ma.scalar, _ma._reconstruct, np.dtype, np.ndarray]
_SAFE += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "bool")]

if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals(_SAFE)
