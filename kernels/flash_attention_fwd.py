"""FlashAttention-2 forward in Triton (Dao 2023, Algorithm 1), and the launch helpers both passes share.

One program per (query block, batch·head): online softmax over key blocks in base 2 (scores pre-scaled by
log2(e)); the per-row log-sum-exp is written in natural log, fp32.  The key loop is split into blocks every row
sees in full (no mask) and diagonal / tail blocks (causal and bounds mask; a row that has seen no key yet keeps
m = -inf, guarded).  The output takes q's memory layout (``alloc_like``).  Semantics: kernels/flash_attention.py.
"""
from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON, LazyKernel, alloc, alloc_like, dot_precision, next_pow2, tl, triton

_LOG2E = 1.4426950408889634


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



# ------------------------------------------------------------------- kernel configs
def _configs(pairs: list[tuple[int, int]], warps: tuple[int, ...], stages: tuple[int, ...]) -> list | None:
    if not HAS_TRITON:
        return None
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n in pairs for w in warps for s in stages]


# Hopper-oriented sweeps; the interpreter uses small fixed blocks (BLOCK_M != BLOCK_N on
# purpose, so the lo/mid/hi block arithmetic is exercised with unequal tiles).
# Autotune once per power-of-two length bucket (TUNE_BUCKET, unused by the kernels) rather


# Hopper-oriented sweeps; the interpreter uses small fixed blocks (BLOCK_M != BLOCK_N on
# purpose, so the lo/mid/hi block arithmetic is exercised with unequal tiles).
# Autotune once per power-of-two length bucket (TUNE_BUCKET, unused by the kernels) rather
# than per exact length, so variable-length batches do not re-tune on every call.
_KEY = ["TUNE_BUCKET", "HEAD_DIM", "CAUSAL", "DOT_PREC"]
# The last, small tile of each list keeps fp32 inputs (4-byte tiles) within shared memory.
_fwd = LazyKernel(_attn_fwd, configs=_configs([(128, 64), (128, 128), (64, 32)], (4, 8), (2, 3)), key=_KEY,
                  interpret={"BLOCK_M": 32, "BLOCK_N": 16})


def _bucket(sq: int, sk: int) -> int:
    return min(next_pow2(max(sq, sk)), 1 << 16)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _prep(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()



def triton_forward(q, k, v, causal: bool, offset: int, sm_scale: float):
    q, k, v = _prep(q), _prep(k), _prep(v)
    b, h, sq, d = q.shape
    kvh, sk = k.shape[1], k.shape[2]
    o = alloc_like(q)                                # q's layout: see _dispatch.alloc_like
    lse = alloc((b, h, sq), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * h)  # noqa: E731
    _fwd(grid, q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
         h, h // kvh, sq, sk, offset, sm_scale * _LOG2E, _bucket(sq, sk),
         CAUSAL=causal, HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)), DOT_PREC=dot_precision(q.dtype))
    return o, lse

