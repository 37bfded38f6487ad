"""FlashAttention-2 forward and backward in Triton (Dao 2023, Algorithms 1 and 2).

Layout: q (batch, heads, seq_q, head_dim); k, v (batch, kv_heads, seq_k, head_dim) with
``heads % kv_heads == 0`` (MHA, GQA, MQA).  Query head ``h`` reads kv head
``h // (heads // kv_heads)``; K/V are never repeated in memory.

Masking: when ``causal``, query ``i`` sees key ``j`` iff ``j <= i + causal_offset``
(offset 0: top-left aligned, the usual causal mask when seq_q == seq_k; offset
``seq_k - seq_q``: bottom-right aligned).  A row that sees no key returns out = 0 and
lse = -inf, so partial results merge correctly (see :func:`merge_attention_partials`).

Forward: online softmax over key blocks in base 2 (scores pre-scaled by log2(e)); the
per-row log-sum-exp is saved (natural log, fp32).  Backward: delta = rowsum(dO * O) - dlse
(the dlse term makes the lse output differentiable: d lse_i / d s_ij = p_ij), then
* the dK/dV kernel owns one kv block of one kv head and loops over every query head of its
  GQA group and over the query blocks, so the group sum is formed in registers —
  deterministic, no atomics;
* the dQ kernel owns one query block and loops over key blocks, recomputing P from lse.
Each loop is split into blocks that need the causal/bounds mask and blocks that do not.
"""
from __future__ import annotations

import math

import torch

from . import reference
from ._dispatch import HAS_TRITON, LazyKernel, alloc, dot_precision, next_pow2, tl, triton, use_triton

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# --------------------------------------------------------------------------- forward
def _attn_fwd(Q, K, V, O, LSE,
              sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
              H, GROUP, SEQ_Q, SEQ_K, OFFSET, qk_scale, TUNE_BUCKET,
              CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < SEQ_Q) & mask_d[None, :], other=0.0)
    k_base = K + b * sk_b + kvh * sk_h + offs_d[None, :]
    v_base = V + b * sv_b + kvh * sv_h + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Key blocks [0, lo) are fully visible to every row of this block and in bounds.
    if CAUSAL:
        lo = tl.maximum(tl.minimum(start_m + OFFSET + 1, SEQ_K), 0) // BLOCK_N * BLOCK_N
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + OFFSET, SEQ_K), 0)
    else:
        lo = SEQ_K // BLOCK_N * BLOCK_N
        hi = SEQ_K
    for start_n in range(0, lo, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[:, None] * sk_s, mask=mask_d[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_s, mask=mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    # Diagonal / tail blocks: mask, and guard rows that have seen no key yet (m = -inf).
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_k = cols < SEQ_K
        k = tl.load(k_base + cols[:, None] * sk_s, mask=in_k[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_s, mask=in_k[:, None] & mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        visible = in_k[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + OFFSET)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = O + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < SEQ_Q) & mask_d[None, :])
    tl.store(LSE + bh * SEQ_Q + offs_m, lse, mask=offs_m < SEQ_Q)


# ------------------------------------------------------------------------ backward
def _attn_bwd_preprocess(O, DO, DLSE, DELTA, so_b, so_h, so_s, sdo_b, sdo_h, sdo_s,
                         H, SEQ_Q, HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id - dlse_i  (FA2 Alg. 2 line 4, plus the lse gradient)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_s + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * SEQ_Q + offs_m, mask=offs_m < SEQ_Q, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * SEQ_Q + offs_m, delta, mask=offs_m < SEQ_Q)


def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s,
                   sdk_b, sdk_h, sdk_s, sdv_b, sdv_h, sdv_s,
                   H, KV_H, GROUP, SEQ_Q, SEQ_K, OFFSET, sm_scale, TUNE_BUCKET,
                   CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b = bkv // KV_H
    kvh = bkv % KV_H
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    kv_mask = (offs_n[:, None] < SEQ_K) & mask_d[None, :]
    k = tl.load(K + b * sk_b + kvh * sk_h + offs_n[:, None] * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * sv_b + kvh * sv_h + offs_n[:, None] * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    # Query blocks before `lo` see none of these keys; blocks in [lo, mid) need the causal
    # mask; blocks from `mid` on see all of them.  Query rows past SEQ_Q load lse = +inf,
    # hence p = 0, so the unmasked loop needs no bounds mask.
    if CAUSAL:
        lo = tl.maximum(start_n - OFFSET, 0) // BLOCK_M * BLOCK_M
        mid = (tl.maximum(start_n + BLOCK_N - 1 - OFFSET, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        mid = tl.minimum(mid, SEQ_Q)
    else:
        lo = 0
        mid = 0
    for g in range(0, GROUP):  # sum over the query heads sharing this kv head (GQA)
        h = kvh * GROUP + g
        q_base = Q + b * sq_b + h * sq_h + offs_d[None, :]
        do_base = DO + b * sdo_b + h * sdo_h + offs_d[None, :]
        row_base = (b * H + h) * SEQ_Q
        for start_m in range(lo, mid, BLOCK_M):
            offs_m = start_m + offs_m0
            in_q = offs_m < SEQ_Q
            q = tl.load(q_base + offs_m[:, None] * sq_s, mask=in_q[:, None] & mask_d[None, :], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdo_s, mask=in_q[:, None] & mask_d[None, :], other=0.0)
            lse = tl.load(LSE + row_base + offs_m, mask=in_q, other=float("inf")) * 1.4426950408889634
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that saw no key
            delta = tl.load(DELTA + row_base + offs_m, mask=in_q, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
            p_t = tl.exp2(s_t - lse[None, :])
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + OFFSET, p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
        for start_m in range(mid, SEQ_Q, BLOCK_M):
            offs_m = start_m + offs_m0
            in_q = offs_m < SEQ_Q
            q = tl.load(q_base + offs_m[:, None] * sq_s, mask=in_q[:, None] & mask_d[None, :], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdo_s, mask=in_q[:, None] & mask_d[None, :], other=0.0)
            lse = tl.load(LSE + row_base + offs_m, mask=in_q, other=float("inf")) * 1.4426950408889634
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(DELTA + row_base + offs_m, mask=in_q, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
            p_t = tl.exp2(s_t - lse[None, :])
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)

    dk *= sm_scale
    tl.store(DK + b * sdk_b + kvh * sdk_h + offs_n[:, None] * sdk_s + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdv_b + kvh * sdv_h + offs_n[:, None] * sdv_s + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s,
                 sdq_b, sdq_h, sdq_s,
                 H, GROUP, SEQ_Q, SEQ_K, OFFSET, sm_scale, TUNE_BUCKET,
                 CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    in_q = offs_m < SEQ_Q
    q_mask = in_q[:, None] & mask_d[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_s + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * SEQ_Q + offs_m, mask=in_q, other=float("inf")) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + bh * SEQ_Q + offs_m, mask=in_q, other=0.0)
    k_base = K + b * sk_b + kvh * sk_h + offs_d[None, :]
    v_base = V + b * sv_b + kvh * sv_h + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    if CAUSAL:
        lo = tl.maximum(tl.minimum(start_m + OFFSET + 1, SEQ_K), 0) // BLOCK_N * BLOCK_N
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + OFFSET, SEQ_K), 0)
    else:
        lo = SEQ_K // BLOCK_N * BLOCK_N
        hi = SEQ_K
    for start_n in range(0, lo, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[:, None] * sk_s, mask=mask_d[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_s, mask=mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_k = cols < SEQ_K
        k = tl.load(k_base + cols[:, None] * sk_s, mask=in_k[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_s, mask=in_k[:, None] & mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        visible = in_k[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + OFFSET)
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    dq *= sm_scale
    tl.store(DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_s + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ------------------------------------------------------------------- kernel configs
def _configs(pairs: list[tuple[int, int]], warps: tuple[int, ...], stages: tuple[int, ...]) -> list | None:
    if not HAS_TRITON:
        return None
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n in pairs for w in warps for s in stages]


# Hopper-oriented sweeps; the interpreter uses small fixed blocks (BLOCK_M != BLOCK_N on
# purpose, so the lo/mid/hi block arithmetic is exercised with unequal tiles).
# Autotune once per power-of-two length bucket (TUNE_BUCKET, unused by the kernels) rather
# than per exact length, so variable-length batches do not re-tune on every call.
_KEY = ["TUNE_BUCKET", "HEAD_DIM", "CAUSAL", "DOT_PREC"]
# The last, small tile of each list keeps fp32 inputs (4-byte tiles) within shared memory.
_fwd = LazyKernel(_attn_fwd, configs=_configs([(128, 64), (128, 128), (64, 32)], (4, 8), (2, 3)), key=_KEY,
                  interpret={"BLOCK_M": 32, "BLOCK_N": 16})
_bwd_pre = LazyKernel(_attn_bwd_preprocess, fixed={"BLOCK_M": 64, "num_warps": 4},
                      interpret={"BLOCK_M": 32})
_bwd_dkdv = LazyKernel(_attn_bwd_dkdv, configs=_configs([(64, 128), (32, 128), (64, 64), (32, 32)], (4, 8), (2, 3)),
                       key=_KEY, interpret={"BLOCK_M": 16, "BLOCK_N": 32})
_bwd_dq = LazyKernel(_attn_bwd_dq, configs=_configs([(128, 64), (64, 64), (128, 32), (32, 32)], (4, 8), (2, 3)),
                     key=_KEY, interpret={"BLOCK_M": 32, "BLOCK_N": 16})


def _bucket(sq: int, sk: int) -> int:
    return min(next_pow2(max(sq, sk)), 1 << 16)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _prep(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ------------------------------------------------------------- launch wrappers
def _triton_forward(q, k, v, causal: bool, offset: int, sm_scale: float):
    q, k, v = _prep(q), _prep(k), _prep(v)
    b, h, sq, d = q.shape
    kvh, sk = k.shape[1], k.shape[2]
    o = alloc((b, h, sq, d), dtype=q.dtype, device=q.device)
    lse = alloc((b, h, sq), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * h)  # noqa: E731
    _fwd(grid, q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
         h, h // kvh, sq, sk, offset, sm_scale * _LOG2E, _bucket(sq, sk),
         CAUSAL=causal, HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)), DOT_PREC=dot_precision(q.dtype))
    return o, lse


def _triton_backward(do, q, k, v, o, lse, dlse, causal: bool, offset: int, sm_scale: float):
    q, k, v, o, do = _prep(q), _prep(k), _prep(v), _prep(o), _prep(do)
    lse = lse.float().contiguous()
    b, h, sq, d = q.shape
    kvh, sk = k.shape[1], k.shape[2]
    block_d = max(16, next_pow2(d))
    prec = dot_precision(q.dtype)
    delta = alloc((b, h, sq), dtype=torch.float32, device=q.device)
    has_dlse = dlse is not None
    dlse_arg = dlse.float().contiguous() if has_dlse else delta
    _bwd_pre(lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * h), o, do, dlse_arg, delta,
             *_strides(o), *_strides(do), h, sq, HAS_DLSE=has_dlse, HEAD_DIM=d, BLOCK_D=block_d)
    dq = alloc(q.shape, dtype=q.dtype, device=q.device)
    dk = alloc(k.shape, dtype=k.dtype, device=k.device)
    dv = alloc(v.shape, dtype=v.dtype, device=v.device)
    _bwd_dkdv(lambda meta: (triton.cdiv(sk, meta["BLOCK_N"]), b * kvh),
              q, k, v, do, lse, delta, dk, dv,
              *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
              h, kvh, h // kvh, sq, sk, offset, sm_scale, _bucket(sq, sk),
              CAUSAL=causal, HEAD_DIM=d, BLOCK_D=block_d, DOT_PREC=prec)
    _bwd_dq(lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * h),
            q, k, v, do, lse, delta, dq,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            h, h // kvh, sq, sk, offset, sm_scale, _bucket(sq, sk),
            CAUSAL=causal, HEAD_DIM=d, BLOCK_D=block_d, DOT_PREC=prec)
    return dq, dk, dv


# ---------------------------------------------------------------------- autograd op
class FlashAttentionFunction(torch.autograd.Function):
    """out, lse = attention(q, k, v); both outputs differentiable."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                causal_offset: int, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        o, lse = _triton_forward(q, k, v, causal, causal_offset, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.set_materialize_grads(False)  # an unused lse then arrives as None: skip its load
        ctx.causal, ctx.offset, ctx.sm_scale = causal, causal_offset, sm_scale
        return o, lse

    @staticmethod
    def backward(ctx, do: torch.Tensor | None, dlse: torch.Tensor | None):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = _triton_backward(do, q, k, v, o, lse, dlse, ctx.causal, ctx.offset, ctx.sm_scale)
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
    return reference.attention_reference(q, k, v, causal, causal_offset, scale)


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, *,
                            causal_offset: int = 0, softmax_scale: float | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-autograd forward: ``(out, lse)``; pair with :func:`flash_attention_backward`."""
    _check(q, k, v)
    scale = _scale(q, softmax_scale)
    with torch.no_grad():
        if use_triton(q, k, v):
            return _triton_forward(q, k, v, bool(causal), int(causal_offset), scale)
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
        return _triton_backward(dout, q, k, v, out, lse, dlse, bool(causal), int(causal_offset), scale)
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
