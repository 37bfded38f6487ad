"""Model-state bytes of one rank (parameters, gradients, optimizer states), exact from the tensors and counted once
per storage. Used by executor/measure.py after a step."""
from __future__ import annotations

import torch


def _bytes(tensors: list[torch.Tensor | None], seen: set) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        key = (s.data_ptr(), s.nbytes())
        if key[1] == 0 or key in seen:
            continue
        seen.add(key)
        total += key[1]
    return total


def state_bytes(dps: list, opt) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes of this rank (each storage once)."""
    seen: set = set()
    units = [u for dp in dps for u in dp.units]
    params = _bytes([u.flat for u in units] + [u.shard_param for u in units], seen)
    grads = _bytes([u.grad for u in units] + [u.shard_grad for u in units], seen)
    optim = _bytes(list(opt.m) + list(opt.v), seen)
    elements = sum(p.numel() for u in units for p in u.params)
    padded = sum(u.numel for u in units)
    return {"params": params, "grads": grads, "optimizer": optim, "param_elements": elements,
            "padded_elements": padded, "units": [u.numel for u in units]}
