"""SwiGLU activation (Shazeer 2020, "GLU Variants Improve Transformer"): silu(gate) * up.

Elementwise and memory bound: one flat 1-D pass forward; the backward recomputes
sigmoid(gate) rather than saving it, so only the two inputs are kept.
  d gate = dy * up * s * (1 + gate * (1 - s)),  d up = dy * gate * s,  s = sigmoid(gate).
"""
from __future__ import annotations

import torch

from .twins import SwiGLUTwin
from ._dispatch import LazyKernel, alloc, tl, triton, use_triton


def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(Y + offs, (g * s * u).to(Y.dtype.element_ty), mask=mask)


def _swiglu_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * g * s).to(DU.dtype.element_ty), mask=mask)


# 1024 elements x 4 warps: 8 elements (16 B of bf16) per thread per tensor -> 128-bit accesses.
_fwd = LazyKernel(_swiglu_fwd, fixed={"BLOCK": 1024, "num_warps": 4}, interpret={"BLOCK": 256})
_bwd = LazyKernel(_swiglu_bwd, fixed={"BLOCK": 1024, "num_warps": 4}, interpret={"BLOCK": 256})


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        y = alloc(gate.shape, dtype=gate.dtype, device=gate.device)
        n = gate.numel()
        _fwd(lambda meta: (triton.cdiv(n, meta["BLOCK"]),), gate, up, y, n)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg = alloc(gate.shape, dtype=gate.dtype, device=gate.device)
        du = alloc(up.shape, dtype=up.dtype, device=up.device)
        n = gate.numel()
        _bwd(lambda meta: (triton.cdiv(n, meta["BLOCK"]),), dy, gate, up, dg, du, n)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for same-shape, same-dtype tensors."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError("gate and up must have the same shape and dtype")
    if use_triton(gate, up):
        return SwiGLUFunction.apply(gate, up)
    return SwiGLUTwin.apply(gate, up)
