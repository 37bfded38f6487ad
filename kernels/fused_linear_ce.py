"""Fused LM head + cross-entropy that never materialises the (tokens, vocab) logits.

Approach (as popularised by Liger-Kernel): the loss is computed in token chunks, and the
gradients are computed *during the forward*, chunk by chunk, because the chunk's logits
are at hand there.  Per chunk:
  1. logits = h_c @ W^T                     (torch.matmul, fp32 accumulation in the GEMM)
  2. a Triton row kernel computes, in fp32, lse (online max / sum-exp over vocab blocks),
     loss_i = lse_i - logit_i[target_i], and overwrites the logits in place with
     dlogits = (softmax - onehot(target)) * scale  (scale = 1/n_valid for "mean", 1 for
     "sum"; ignored rows get 0) — the buffer is reused, no second (C, V) tensor;
  3. grad_h[c] = dlogits @ W and grad_W += dlogits^T @ h_c.
Backward only multiplies the stored grad_h / grad_W by the incoming scalar grad.

Chunk size: logits chunks are capped at ``_CHUNK_BYTES`` (256 MiB): for V = 128256 in bf16
that is 1024 tokens, large enough that the three GEMMs per chunk (each reads all of W) stay
compute bound (arithmetic intensity ~ chunk tokens FLOP/byte of W), small next to W itself.

grad_W accumulation: by default in W's dtype with an in-place ``addmm`` (each chunk's GEMM
accumulates in fp32 internally; one rounding per chunk) — this keeps peak memory low.  Pass
``accum_dtype=torch.float32`` for an fp32 accumulator across chunks (+4 bytes/param of
memory and an extra add per chunk).  In fp32 both are identical.  Backward runs once.
"""
from __future__ import annotations

import torch

from . import reference
from ._dispatch import LazyKernel, alloc, interpret_mode, next_pow2, tl, use_triton

_CHUNK_BYTES = 256 * 1024 * 1024


def _ce_rows(LOGITS, TARGETS, LOSS, SCALE, stride, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    target = tl.load(TARGETS + row).to(tl.int64)
    valid = target != ignore_index
    cols0 = tl.arange(0, BLOCK_V)
    # Pass 1: running max and rescaled sum of exp over vocab blocks (online softmax).
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(l)
    safe_t = tl.where(valid, target, 0)
    x_t = tl.load(base + safe_t).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - x_t, 0.0))
    # Pass 2: overwrite logits with d loss / d logits.
    scale = tl.where(valid, tl.load(SCALE).to(tl.float32), 0.0)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(cols == safe_t, 1.0, 0.0)) * scale
        tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


_ce = LazyKernel(_ce_rows, fixed={"BLOCK_V": 4096, "num_warps": 16}, interpret={"BLOCK_V": 64})


def default_chunk_size(n_tokens: int, vocab: int, dtype: torch.dtype) -> int:
    """Tokens per chunk so the chunk's logits take at most ~256 MiB (multiple of 64)."""
    elt = torch.finfo(dtype).bits // 8
    c = max(64, _CHUNK_BYTES // (vocab * elt) // 64 * 64)
    return max(1, min(c, n_tokens))


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size, accum_dtype):
        shape = hidden.shape
        h2 = hidden.reshape(-1, shape[-1])
        t = targets.reshape(-1).contiguous()
        n, v = h2.shape[0], weight.shape[0]
        valid = t != ignore_index
        scale = (1.0 / valid.sum().to(torch.float32)) if reduction == "mean" else \
            torch.ones((), dtype=torch.float32, device=h2.device)
        scale = scale.reshape(1)  # read by the kernel through a pointer: no host sync
        loss_rows = alloc((n,), dtype=torch.float32, device=h2.device)
        grad_h = alloc(h2.shape, dtype=h2.dtype, device=h2.device) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(weight.shape, dtype=accum_dtype or weight.dtype, device=weight.device)
        c = chunk_size or default_chunk_size(n, v, h2.dtype)
        for s in range(0, n, c):
            h_c = h2[s:s + c]
            logits = torch.matmul(h_c, weight.t())  # (rows, V), contiguous
            _ce((logits.shape[0],), logits, t[s:s + c], loss_rows[s:s + c], scale, logits.stride(0), v,
                ignore_index)
            if grad_h is not None:
                torch.matmul(logits, weight, out=grad_h[s:s + c])
            if grad_w is not None:
                if grad_w.dtype == logits.dtype:
                    grad_w.addmm_(logits.t(), h_c)
                else:
                    grad_w += torch.matmul(logits.t(), h_c).to(grad_w.dtype)
            del logits
        ctx.grad_h, ctx.grad_w, ctx.shape, ctx.w_dtype = grad_h, grad_w, shape, weight.dtype
        return loss_rows.sum() * scale[0]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.grad_h, ctx.grad_w
        ctx.grad_h = ctx.grad_w = None  # release the buffers; a second backward is unsupported
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_out.to(grad_h.dtype)).reshape(ctx.shape)
        if grad_w is not None:
            grad_w = grad_w.to(ctx.w_dtype) if grad_w.dtype != ctx.w_dtype else grad_w
            grad_w = grad_w.mul_(grad_out.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, reduction: str = "mean", *,
                               chunk_size: int | None = None,
                               accum_dtype: torch.dtype | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets) without materialising all logits.

    hidden: (..., H); weight: (V, H); targets: (...) int64 with values in [0, V) or
    ``ignore_index``.  ``reduction``: "mean" (over non-ignored tokens; NaN if there are
    none, like torch) or "sum".  Returns an fp32 scalar.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError("reduction must be 'mean' or 'sum'")
    if hidden.shape[-1] != weight.shape[1] or hidden.shape[:-1] != targets.shape:
        raise ValueError(f"shapes hidden={tuple(hidden.shape)} weight={tuple(weight.shape)} "
                         f"targets={tuple(targets.shape)} do not match")
    if hidden.dtype != weight.dtype:
        raise ValueError("hidden and weight must share a dtype")
    if use_triton(hidden, weight, targets):
        return FusedLinearCrossEntropyFunction.apply(hidden, weight.contiguous(), targets, int(ignore_index),
                                                     reduction, chunk_size, accum_dtype)
    return reference.linear_cross_entropy_reference(hidden, weight, targets, ignore_index, reduction)
