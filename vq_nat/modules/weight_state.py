"""When may a value derived from parameters (a packed or reordered weight, a memoised output) be reused?

A cache keyed on each parameter's storage and version counter sees in-place changes made through the parameter
itself (``param.add_``, ``load_state_dict``'s ``copy_``, torch's optimizers). It does not see changes made through
``param.data``, whose in-place ops bump no version: fairseq's optimizers (Adam, the fp16 wrappers' copy back)
update weights that way, and ``module.half()`` / ``.to()`` assign ``param.data``, which may reuse a freed address.
So ``state_key`` also holds a counter of optimizer steps taken anywhere in the process (a global torch optimizer
step hook: fairseq's optimizers are ``torch.optim.Optimizer`` subclasses) and of explicit ``changed()`` calls
(``LatentTransformerModel._apply``: dtype and device moves). Plain torch: no fairseq import.
"""
from typing import Optional, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_generation = 0


def changed(*_args) -> None:
    """Parameters may have changed without their version counters noticing: every ``state_key`` differs now."""
    global _generation
    _generation += 1


register_optimizer_step_post_hook(changed)


def state_key(*tensors: Optional[torch.Tensor]) -> Tuple:
    """Identifies the current values of ``tensors``: the process-wide generation, then each tensor's storage,
    version, dtype and device (None for a missing tensor)."""
    return (_generation,) + tuple(
        (t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None for t in tensors
    )


class DerivedCache(dict):
    """Values derived from a module's parameters (packed or reordered weights, resolved layers, memoised
    outputs), kept on the module under ``derived(module)``. Never copied: ``copy.deepcopy`` and pickling give an
    empty cache, which the copy fills from its own parameters (a copied entry could refer to the original's
    parameters, and oneDNN's packed weights cannot be copied at all)."""

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return type(self), ()


def reuse(store: dict, slot, key, build):
    """``build()``, kept in ``store[slot]`` as ``(key, value)`` and returned again while ``key`` is the same."""
    hit = store.get(slot)
    if hit is None or hit[0] != key:
        hit = store[slot] = (key, build())
    return hit[1]


def derived(module: torch.nn.Module) -> DerivedCache:
    """The cache of values derived from ``module``'s parameters (created empty on first use)."""
    d = module.__dict__
    cache = d.get("_derived")
    if cache is None:
        cache = d["_derived"] = DerivedCache()
    return cache
