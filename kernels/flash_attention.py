"""FlashAttention-2 (Dao 2023): the autograd op and the public API.  Kernels: flash_attention_fwd.py (Alg. 1)
and flash_attention_bwd.py (Alg. 2).  CPU / no-Triton: twins.AttentionTwin, which saves the same tensors.

Layout: q (batch, heads, seq_q, head_dim); k, v (batch, kv_heads, seq_k, head_dim) with
``heads % kv_heads == 0`` (MHA, GQA, MQA).  Query head ``h`` reads kv head
``h // (heads // kv_heads)``; K/V are never repeated in memory.

Masking: when ``causal``, query ``i`` sees key ``j`` iff ``j <= i + causal_offset``
(offset 0: top-left aligned, the usual causal mask when seq_q == seq_k; offset
``seq_k - seq_q``: bottom-right aligned).  A row that sees no key returns out = 0 and
lse = -inf, so partial results merge correctly (see :func:`merge_attention_partials`).
Forward saves (q, k, v, out, lse); the backward recomputes P = exp(S - lse) block by block.
"""
from __future__ import annotations

import math

import torch

from . import reference
from ._dispatch import use_triton
from .flash_attention_bwd import triton_backward
from .flash_attention_fwd import triton_forward
from .twins import AttentionTwin


# ---------------------------------------------------------------------- autograd op
class FlashAttentionFunction(torch.autograd.Function):
    """out, lse = attention(q, k, v); both outputs differentiable."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                causal_offset: int, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        o, lse = triton_forward(q, k, v, causal, causal_offset, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.set_materialize_grads(False)  # an unused lse then arrives as None: skip its load
        ctx.causal, ctx.offset, ctx.sm_scale = causal, causal_offset, sm_scale
        return o, lse

    @staticmethod
    def backward(ctx, do: torch.Tensor | None, dlse: torch.Tensor | None):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = triton_backward(do, q, k, v, o, lse, dlse, ctx.causal, ctx.offset, ctx.sm_scale)
        return dq, dk, dv, None, None, None


# ------------------------------------------------------------------------ public API
def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flash attention expects (batch, heads, seq, head_dim) tensors")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible shapes q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"heads ({q.shape[1]}) must be a multiple of kv_heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def _scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def flash_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                             *, causal_offset: int = 0, softmax_scale: float | None = None,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention returning ``(out, lse)``, differentiable in both.

    q: (b, h, sq, d); k, v: (b, kv_h, sk, d); sq and sk may differ.  ``lse`` is
    (b, h, sq) fp32, natural log.  For ring / context-parallel attention call it on the
    diagonal block with ``causal=True`` and on past blocks with ``causal=False``, then
    combine with :func:`merge_attention_partials`; gradients flow through the merge.
    """
    _check(q, k, v)
    scale = _scale(q, softmax_scale)
    if use_triton(q, k, v):
        return FlashAttentionFunction.apply(q, k, v, bool(causal), int(causal_offset), scale)
    return AttentionTwin.apply(q, k, v, bool(causal), int(causal_offset), scale)


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, *,
                            causal_offset: int = 0, softmax_scale: float | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-autograd forward: ``(out, lse)``; pair with :func:`flash_attention_backward`.  (Twin: reference.py.)"""
    _check(q, k, v)
    scale = _scale(q, softmax_scale)
    with torch.no_grad():
        if use_triton(q, k, v):
            return triton_forward(q, k, v, bool(causal), int(causal_offset), scale)
        return reference.attention_reference(q, k, v, causal, causal_offset, scale)


def flash_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, causal: bool = False, *,
                             causal_offset: int = 0, softmax_scale: float | None = None,
                             dlse: torch.Tensor | None = None,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-autograd backward: ``(dq, dk, dv)`` of one (q block, kv block) pair.

    P is recomputed as exp(s - lse) and delta = rowsum(dout * out) - dlse.  Ring attention
    can pass the *merged* ``out``/``lse`` (over all kv blocks) and the merged ``dout`` for
    every block: P then is this block's slice of the full softmax and delta the full-row
    value, so the returned gradients are exactly this block's share — no per-block outputs
    need to be kept, and no dlse is needed.
    """
    _check(q, k, v)
    scale = _scale(q, softmax_scale)
    if use_triton(q, k, v):
        return triton_backward(dout, q, k, v, out, lse, dlse, bool(causal), int(causal_offset), scale)
    return reference.attention_backward_reference(dout, q, k, v, out, lse, causal, causal_offset, scale, dlse)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    return_lse: bool = False, *, softmax_scale: float | None = None,
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale [+ causal mask]) v in layout (batch, heads, seq, head_dim)."""
    out, lse = flash_attention_with_lse(q, k, v, causal, softmax_scale=softmax_scale)
    return (out, lse) if return_lse else out


def merge_attention_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                             lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets from their (out, lse) pairs.

    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse), lse = logaddexp(lse_a, lse_b),
    computed in fp32; a side with lse = -inf (no visible key) contributes nothing.
    """
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a.float() - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b.float() - safe).unsqueeze(-1)
    out = out_a.float() * w_a + out_b.float() * w_b
    return out.to(out_a.dtype), lse

