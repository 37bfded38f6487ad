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
    # the fp32 masters are the parameters in fp32 training, optimizer state under bf16/fp16 (ZeRO §3.1's K)
    lowp = [u.flat.dtype != torch.float32 for u in units]
    params = _bytes([u.flat for u in units] + [u.shard_lowp for u in units]
                    + [u.shard_param for u, low in zip(units, lowp) if not low], seen)
    grads = _bytes([u.grad for u in units] + [u.shard_grad for u in units], seen)
    optim = _bytes([u.shard_param for u, low in zip(units, lowp) if low] + list(opt.m) + list(opt.v), seen)
    elements = sum(p.numel() for u in units for p in u.params)
    padded = sum(u.numel for u in units)
    return {"params": params, "grads": grads, "optimizer": optim, "param_elements": elements,
            "padded_elements": padded, "units": [u.numel for u in units]}
