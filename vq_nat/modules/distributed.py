"""Tiny torch.distributed helpers: EMA codebook statistics are all-reduced so that ranks never diverge."""
from typing import Optional

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor; no-op without an initialised process group)."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from rank ``src`` (no-op without an initialised process group)."""
    if is_distributed():
        dist.broadcast(t, src=src)
    return t


def first_rank_with(flag: bool, device=None) -> Optional[int]:
    """The lowest rank where ``flag`` holds, None where it holds on none (every rank must call this). Without an
    initialised process group: 0 or None."""
    if not is_distributed():
        return 0 if flag else None
    t = torch.zeros(dist.get_world_size(), device=device)
    t[dist.get_rank()] = float(flag)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    found = t.nonzero()
    return int(found[0, 0]) if found.numel() else None
