"""Tiny torch.distributed helpers: EMA codebook statistics are all-reduced so that ranks never diverge."""
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
