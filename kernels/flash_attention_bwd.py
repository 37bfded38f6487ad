"""FlashAttention-2 backward in Triton (Dao 2023, Algorithm 2).

delta = rowsum(dO * O) - dlse (the dlse term makes the lse output differentiable: d lse_i / d s_ij = p_ij), then
* the dK/dV kernel owns one kv block of one kv head and loops over every query head of its GQA group and over the
  query blocks, so the group sum is formed in registers — deterministic, no atomics;
* the dQ kernel owns one query block and loops over key blocks, recomputing P from lse.
Each loop is split into blocks that need the causal/bounds mask and blocks that do not.
"""
from __future__ import annotations

import torch

from ._dispatch import LazyKernel, alloc, dot_precision, next_pow2, tl, triton
from .flash_attention_fwd import _KEY, _bucket, _configs, _prep, _strides


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



# Block configs: see flash_attention_fwd.py.
_bwd_pre = LazyKernel(_attn_bwd_preprocess, fixed={"BLOCK_M": 64, "num_warps": 4},
                      interpret={"BLOCK_M": 32})
_bwd_dkdv = LazyKernel(_attn_bwd_dkdv, configs=_configs([(64, 128), (32, 128), (64, 64), (32, 32)], (4, 8), (2, 3)),
                       key=_KEY, interpret={"BLOCK_M": 16, "BLOCK_N": 32})
_bwd_dq = LazyKernel(_attn_bwd_dq, configs=_configs([(128, 64), (64, 64), (128, 32), (32, 32)], (4, 8), (2, 3)),
                     key=_KEY, interpret={"BLOCK_M": 32, "BLOCK_N": 16})


def triton_backward(do, q, k, v, o, lse, dlse, causal: bool, offset: int, sm_scale: float):
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

