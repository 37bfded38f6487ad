"""Rotary position embedding (Su et al., RoFormer), Llama "rotate-half" convention.

For head_dim d = 2*h:  out[:h] = x1*cos[:h] - x2*sin[:h],  out[h:] = x2*cos[h:] + x1*sin[h:]
with x1 = x[:h], x2 = x[h:] (= x*cos + rotate_half(x)*sin).  The backward is the transposed
rotation (same kernel, BACKWARD=True):  dx1 = dy1*cos[:h] + dy2*sin[h:],
dx2 = dy2*cos[h:] - dy1*sin[:h].  cos/sin are treated as constants (no gradient).

Layout: q (batch, heads, seq, head_dim), k (batch, kv_heads, seq, head_dim).  cos/sin are
(seq, head_dim) tables, or (max_position, head_dim) tables indexed by ``position_ids`` of
shape (seq,) or (batch, seq) — arbitrary per-token positions (e.g. context-parallel zigzag).
One program per (token, batch) rotates all q heads and all k heads of that token, loading
its cos/sin row once.
"""
from __future__ import annotations

import torch

from .twins import RoPETwin
from ._dispatch import LazyKernel, alloc_like, interpret_mode, next_pow2, tl, use_triton


def _rope_kernel(Q, K, OQ, OK, COS, SIN, POS,
                 sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, soq_b, soq_h, soq_s, sok_b, sok_h, sok_s,
                 scos, ssin, spos_b, spos_s, HQ, HK,
                 HAS_POS: tl.constexpr, BACKWARD: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    if HAS_POS:
        pos = tl.load(POS + b * spos_b + s * spos_s).to(tl.int64)
    else:
        pos = s
    d = tl.arange(0, BLOCK_HALF)
    md = d < HALF
    c1 = tl.load(COS + pos * scos + d, mask=md, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + pos * scos + HALF + d, mask=md, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + pos * ssin + d, mask=md, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + pos * ssin + HALF + d, mask=md, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:  # transpose of the rotation
        s1, s2 = -s2, -s1

    hq = tl.arange(0, BLOCK_HQ)
    mq = (hq[:, None] < HQ) & md[None, :]
    q_ptr = Q + b * sq_b + s * sq_s + hq[:, None] * sq_h + d[None, :]
    q1 = tl.load(q_ptr, mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + HALF, mask=mq, other=0.0).to(tl.float32)
    oq_ptr = OQ + b * soq_b + s * soq_s + hq[:, None] * soq_h + d[None, :]
    tl.store(oq_ptr, (q1 * c1 - q2 * s1).to(OQ.dtype.element_ty), mask=mq)
    tl.store(oq_ptr + HALF, (q2 * c2 + q1 * s2).to(OQ.dtype.element_ty), mask=mq)

    hk = tl.arange(0, BLOCK_HK)
    mk = (hk[:, None] < HK) & md[None, :]
    k_ptr = K + b * sk_b + s * sk_s + hk[:, None] * sk_h + d[None, :]
    k1 = tl.load(k_ptr, mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(k_ptr + HALF, mask=mk, other=0.0).to(tl.float32)
    ok_ptr = OK + b * sok_b + s * sok_s + hk[:, None] * sok_h + d[None, :]
    tl.store(ok_ptr, (k1 * c1 - k2 * s1).to(OK.dtype.element_ty), mask=mk)
    tl.store(ok_ptr + HALF, (k2 * c2 + k1 * s2).to(OK.dtype.element_ty), mask=mk)


_kernel = LazyKernel(_rope_kernel)


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            pos: torch.Tensor | None, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, s, d = q.shape
    hk = k.shape[1]
    oq, ok = alloc_like(q), alloc_like(k)           # the inputs' layout (see alloc_like)
    if pos is None:
        pos_arg, spos = cos, (0, 0)  # dummy pointer, never read (HAS_POS=False)
    else:
        pos_arg, spos = pos, ((pos.stride(0), pos.stride(1)) if pos.dim() == 2 else (0, pos.stride(0)))
    st = lambda t: (t.stride(0), t.stride(1), t.stride(2))  # noqa: E731
    warps = {} if interpret_mode() else {"num_warps": 4 if hq * d <= 4096 else 8}
    _kernel((s, b), q, k, oq, ok, cos, sin, pos_arg, *st(q), *st(k), *st(oq), *st(ok),
            cos.stride(0), sin.stride(0), *spos, hq, hk,
            HAS_POS=pos is not None, BACKWARD=backward, HALF=d // 2, BLOCK_HALF=next_pow2(d // 2),
            BLOCK_HQ=next_pow2(hq), BLOCK_HK=next_pow2(hk), **warps)
    return oq, ok


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        ctx.save_for_backward(cos, sin, position_ids)
        return _launch(q, k, cos, sin, position_ids, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, pos = ctx.saved_tensors
        gq, gk = _launch(dq.contiguous(), dk.contiguous(), cos, sin, pos, backward=True)
        return gq, gk, None, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (b, h, s, d) and k (b, kv_h, s, d); returns new tensors (q_rot, k_rot).

    ``cos``/``sin``: (seq, d) when ``position_ids`` is None, else (max_position, d) tables
    indexed by integer ``position_ids`` of shape (seq,) or (batch, seq).
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"expected q (b,h,s,d), k (b,kv_h,s,d); got {tuple(q.shape)}, {tuple(k.shape)}")
    d = q.shape[-1]
    if d % 2 or cos.shape[-1] != d or sin.shape != cos.shape or cos.dim() != 2:
        raise ValueError("head_dim must be even and cos/sin must be (positions, head_dim)")
    if position_ids is None and cos.shape[0] < q.shape[2]:
        raise ValueError("cos/sin have fewer rows than the sequence length")
    if use_triton(q, k, cos, sin):
        cos = cos if cos.stride(-1) == 1 else cos.contiguous()
        sin = sin if sin.stride(-1) == 1 else sin.contiguous()
        return RoPEFunction.apply(q, k, cos.detach(), sin.detach(), position_ids)
    return RoPETwin.apply(q, k, cos.detach(), sin.detach(), position_ids)
