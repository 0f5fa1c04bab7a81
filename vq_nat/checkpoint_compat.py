"""Let torch >= 2.6 load fairseq checkpoints, whose default ``torch.load`` is weights-only.

fairseq 0.12 calls ``torch.load(f, map_location=...)`` without ``weights_only``; torch >= 2.6 then refuses
the Python objects a fairseq checkpoint holds (``argparse.Namespace`` from older checkpoints, numpy scalars
in the saved meters, omegaconf containers, ...). We allow exactly those types with
``torch.serialization.add_safe_globals`` when the plugin is imported: no weights-only bypass. A file that is
not a fairseq checkpoint (an image_ae checkpoint, say) is named in one line instead of torch's unpickling advice.
"""
import argparse
import collections
import functools
import os
import pickle
import pickletools
import zipfile
from typing import Optional

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


def _pickled_strings(path: str) -> set:
    """The string constants of a torch zip checkpoint's pickle (its top-level keys among them), read with
    ``pickletools`` -- nothing is unpickled (the tensors live outside the pickle: it is small)."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl"))
            data = z.read(name)
        return {arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)}
    except Exception:
        return set()


class UnreadableCheckpoint(RuntimeError):
    """A file fairseq cannot load as a checkpoint: another program's, corrupt or truncated."""


def _named_load(load):
    @functools.wraps(load)
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        try:
            return load(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as e:  # OSError: some truncations
            keys = _pickled_strings(str(path))
            first = ("it holds Python objects that fairseq does not save" if isinstance(e, pickle.UnpicklingError)
                     else (str(e).strip().splitlines() or [type(e).__name__])[0][:200])
            what = ("an image_ae checkpoint (python -m image_ae.train); fairseq-generate, fairseq-interactive and "
                    "vq_nat.hub take checkpoints saved by fairseq-train"
                    if {"step", "rng", "args"} <= keys and "cfg" not in keys
                    else f"not a readable fairseq checkpoint (another program's file, corrupt or truncated: {first})")
            raise UnreadableCheckpoint(f"cannot load {path}: {what}") from None

    return load_checkpoint_to_cpu


def install() -> None:
    """Name foreign files in fairseq's checkpoint loading (called once, when the plugin registers)."""
    from fairseq import checkpoint_utils

    if not getattr(checkpoint_utils.load_checkpoint_to_cpu, "_vq_nat", False):
        checkpoint_utils.load_checkpoint_to_cpu = _named_load(checkpoint_utils.load_checkpoint_to_cpu)
        checkpoint_utils.load_checkpoint_to_cpu._vq_nat = True


def get(obj, key):
    """``obj[key]`` or ``obj.key`` for the dicts, omegaconf configs and Namespaces of a checkpoint (None if absent)."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    try:
        return obj[key] if hasattr(obj, "__getitem__") and not isinstance(obj, (str, bytes)) else getattr(obj, key)
    except (KeyError, TypeError, AttributeError):
        return getattr(obj, key, None)


def trained_dictionary(state, lang: str) -> Optional[str]:
    """The ``dict.<lang>.txt`` a fairseq checkpoint (its loaded ``state``) was trained with, when its training
    data directory is on this machine (else None)."""
    data = get(get(state.get("cfg"), "task"), "data") or get(state.get("args"), "data")
    path = os.path.join(str(data).split(os.pathsep)[0], f"dict.{lang}.txt") if data and lang else None
    return path if path and os.path.isfile(path) else None
