"""Memory-faithful torch twins: autograd Functions that save exactly what the Triton Functions save.

The plain functions of kernels/reference.py differentiate through ordinary autograd, which keeps every
intermediate it needs (attention scores and probabilities, the expanded GQA K/V, the norm's x·rstd, silu(gate)).
That is fine for an oracle, but the executor on CPU runs these twins, and `loom verify` measures the tensors it
saves for backward against the memory model, which describes what the GPU kernels keep. So each twin here has the
same `ctx.save_for_backward` as its Triton Function and computes its backward from the saved tensors with the
torch formulas of reference.py (the same formulas the Triton backward kernels implement):

| op | saved (Triton Function and twin) |
|---|---|
| attention | q, k, v (kv_heads, never expanded), out, lse (fp32) — FlashAttention-2 (Dao 2023, Alg. 2) |
| RMSNorm | x, weight, rstd (fp32, one per row) |
| RoPE | cos, sin, position_ids (tables only: the rotation is linear) |
| SwiGLU | gate, up (the backward recomputes the sigmoid) |

Outputs of attention and RoPE take their input's memory layout (`_dispatch.alloc_like`), as the Triton launchers
do, so a sequence-first caller gets a sequence-first output that reshapes into the next linear without a copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from ._dispatch import alloc_like


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _in_layout_of(src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`src` (same shape as `like`) stored in `like`'s memory layout; `src` itself when it already is."""
    if src.stride() == like.stride():
        return src
    out = alloc_like(like, dtype=src.dtype)
    out.copy_(src)
    return out


class AttentionTwin(torch.autograd.Function):
    """(out, lse) = attention(q, k, v); saves q, k, v, out, lse like FlashAttentionFunction."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, causal_offset: int,
                sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = reference.attention_reference(q, k, v, causal, causal_offset, sm_scale)
        out = _in_layout_of(out, q)                 # lse is fp32 (float64 for float64 inputs), as in Triton
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)  # an unused lse arrives as None, as in the Triton Function
        ctx.cfg = (causal, causal_offset, sm_scale)
        return out, lse

    @staticmethod
    def backward(ctx, dout: torch.Tensor | None, dlse: torch.Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        causal, offset, scale = ctx.cfg
        # P is recomputed from lse (FlashAttention-2's backward); it is a transient of this call only.
        dq, dk, dv = reference.attention_backward_reference(dout, q, k, v, out, lse, causal, offset, scale, dlse)
        return dq, dk, dv, None, None, None


class RMSNormTwin(torch.autograd.Function):
    """y = x·rstd·w, rstd = rsqrt(mean(x²) + eps) in fp32; saves x, weight, rstd like RMSNormFunction."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        acc = _acc(x.dtype)
        xf = x.to(acc)
        rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd[..., None] * weight.to(acc)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        acc = rstd.dtype
        # dx = rstd·(w·dy − x̂·mean(x̂·w·dy)), dw = Σ_rows dy·x̂ (kernels/rmsnorm.py, same derivation)
        x_hat = x.to(acc) * rstd[..., None]
        wdy = weight.to(acc) * dy.to(acc)
        c = (x_hat * wdy).mean(-1, keepdim=True)
        dx = (wdy - x_hat * c) * rstd[..., None]
        dw = (dy.to(acc) * x_hat).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype), None


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, transpose: bool) -> torch.Tensor:
    """x·cos + R(x)·sin with R = rotate_half, or its transpose dy·cos + Rᵀ(dy·sin), Rᵀ(y) = (y₂, −y₁)."""
    acc = _acc(x.dtype)
    xf = x.to(acc)
    if not transpose:
        y = xf * c + reference._rotate_half(xf) * s
    else:
        t1, t2 = (xf * s).chunk(2, dim=-1)
        y = xf * c + torch.cat((t2, -t1), dim=-1)
    return y.to(x.dtype)


class RoPETwin(torch.autograd.Function):
    """Rotate q and k; saves only cos, sin, position_ids like RoPEFunction (the map is linear in q, k)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):
        ctx.save_for_backward(cos, sin, position_ids)
        c, s = reference.rope_tables(cos, sin, q.shape[2], position_ids)
        c, s = c.to(_acc(q.dtype)), s.to(_acc(q.dtype))
        return _in_layout_of(_rotate(q, c, s, False), q), _in_layout_of(_rotate(k, c, s, False), k)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, pos = ctx.saved_tensors
        c, s = reference.rope_tables(cos, sin, dq.shape[2], pos)
        c, s = c.to(_acc(dq.dtype)), s.to(_acc(dq.dtype))
        return _rotate(dq, c, s, True), _rotate(dk, c, s, True), None, None, None


class SwiGLUTwin(torch.autograd.Function):
    """silu(gate)·up; saves gate and up like SwiGLUFunction (the backward recomputes the sigmoid)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        acc = _acc(gate.dtype)
        return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        acc = _acc(gate.dtype)
        g, u, d = gate.to(acc), up.to(acc), dy.to(acc)
        sg = torch.sigmoid(g)
        # d gate = dy·up·σ·(1 + g·(1 − σ)), d up = dy·g·σ (kernels/swiglu.py)
        return (d * u * sg * (1 + g * (1 - sg))).to(gate.dtype), (d * g * sg).to(up.dtype)
