"""Checks of the options and tensors that enter ``vq_nat.modules``: a wrong value is a ValueError or TypeError
that names it, says what is valid and what to do, raised where it enters instead of a silently wrong result or a
traceback from deep inside torch. Plain PyTorch: no fairseq import.
"""
import math
import numbers
from typing import Optional

import torch


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_int(owner: str, name: str, value, low: int, high: Optional[int] = None) -> int:
    """``value`` as an int in [low, high] (high None: no upper bound), or a TypeError / ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{owner}: {name} must be {bound}, got {value}")
    return int(value)


def check_float(owner: str, name: str, value, low: float, high: Optional[float] = None, low_open: bool = False,
                high_open: bool = False) -> float:
    """``value`` as a finite float in the interval (high None: no upper bound; never NaN or inf)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    ok = (math.isfinite(v) and (v > low if low_open else v >= low)
          and (high is None or (v < high if high_open else v <= high)))
    if not ok:
        bound = _interval(low, "inf" if high is None else high, low_open, high is None or high_open)
        raise ValueError(f"{owner}: {name} must be a finite number in {bound}, got {value}")
    return v


def check_choice(owner: str, name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def module_device(module: torch.nn.Module) -> Optional[torch.device]:
    """The device of a module's first parameter or buffer (None: it holds no tensor)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def check_features(owner: str, module: torch.nn.Module, x: torch.Tensor, dim: int, name: str = "z_e") -> None:
    """``x`` is a floating-point tensor (..., dim) on the module's device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: {name} must be a floating-point tensor, got {x.dtype} (integer values would be "
                        f"truncated); pass {name}.float()")
    if x.dim() == 0:
        raise ValueError(f"{owner}: {name} must have shape (..., {dim}), got a 0-dimensional tensor")
    if x.size(-1) != dim:
        raise ValueError(f"{owner}: {name} has last dimension {x.size(-1)} (shape {tuple(x.shape)}), expected {dim}")
    device = module_device(module)
    if device is not None and x.device != device:
        raise ValueError(f"{owner}: {name} is on {x.device} but the module is on {device}; move one of them, e.g. "
                         f"{name}.to({str(device)!r})")


def as_padding_mask(owner: str, padding_mask: Optional[torch.Tensor], shape, device: torch.device,
                    name: str = "padding_mask", meaning: str = "True = padding") -> Optional[torch.Tensor]:
    """``padding_mask`` (True / 1 = padding, or what ``meaning`` says) as a bool tensor of ``shape`` on ``device``
    (None stays None).

    Accepts bool, any integer dtype and floating point holding only 0 and 1; anything else (e.g. a float mask of
    probabilities, or a mask of lengths) is a ValueError, since ``~`` or a cast would turn it into another mask
    without a word.
    """
    if padding_mask is None:
        return None
    if not isinstance(padding_mask, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor or None, got {type(padding_mask).__name__}")
    if tuple(padding_mask.shape) != tuple(shape):
        raise ValueError(f"{owner}: {name} has shape {tuple(padding_mask.shape)}, expected {tuple(shape)} (the "
                         f"input's shape without its last dimension)")
    if padding_mask.device != device:
        raise ValueError(f"{owner}: {name} is on {padding_mask.device} but the input is on {device}; move it with "
                         f"{name}.to({str(device)!r})")
    if padding_mask.dtype == torch.bool:
        return padding_mask
    if padding_mask.is_complex():
        raise TypeError(f"{owner}: {name} must be bool ({meaning}), integer or float 0/1, got {padding_mask.dtype}")
    if padding_mask.numel() and not bool(((padding_mask == 0) | (padding_mask == 1)).all()):
        bad = padding_mask[(padding_mask != 0) & (padding_mask != 1)].flatten()[0].item()
        raise ValueError(f"{owner}: {name} of dtype {padding_mask.dtype} must hold only 0 and 1, found {bad!r}; "
                         f"pass a bool mask ({meaning})")
    return padding_mask != 0


def check_codes(owner: str, codes: torch.Tensor, num_codes: int, device: Optional[torch.device],
                name: str = "codes") -> None:
    """Code indices: an integer tensor with values in [0, num_codes) on ``device``."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"{owner}: {name} must be an integer tensor of code indices, got {codes.dtype}; pass "
                        f"{name}.long()")
    if device is not None and codes.device != device:
        raise ValueError(f"{owner}: {name} is on {codes.device} but the module is on {device}; move it with "
                         f"{name}.to({str(device)!r})")
    if codes.numel() and bool(((codes < 0) | (codes >= num_codes)).any()):
        raise ValueError(f"{owner}: {name} must be in [0, {num_codes}), got values in [{int(codes.min())}, "
                         f"{int(codes.max())}]")
