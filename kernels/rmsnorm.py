"""RMSNorm (Zhang & Sennrich 2019): y = x * rsqrt(mean(x^2) + eps) * weight, last dim.

Statistics are fp32 whatever the input dtype.  Forward: one program per row, saving
rstd (fp32) for the backward.  Backward: a fixed number of programs each own a contiguous
range of rows, write dx row by row and keep the weight-gradient partial sum in fp32
registers; the (programs, hidden) partials are then summed by torch — deterministic, no
atomics.  dx = rstd * (w*dy - x_hat * mean(x_hat * w*dy)),  dw = sum_rows dy * x_hat.
"""
from __future__ import annotations

import torch

from .twins import RMSNormTwin
from ._dispatch import LazyKernel, alloc, interpret_mode, next_pow2, tl, triton, use_triton


def _rms_fwd(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


def _rms_bwd(DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, M, N, ROWS_PER_PROG,
             BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    start = pid.to(tl.int64) * ROWS_PER_PROG  # int64 row index: rows * stride may pass 2^31
    end = tl.minimum(start + ROWS_PER_PROG, M)
    for row in range(start, end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        wdy = w * dy
        c = tl.sum(x_hat * wdy, 0) / N
        tl.store(DX + row * stride_dx + cols, ((wdy - x_hat * c) * rstd).to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)


_fwd = LazyKernel(_rms_fwd)
_bwd = LazyKernel(_rms_bwd)


def _warps(block: int) -> dict[str, int]:
    return {} if interpret_mode() else {"num_warps": 4 if block <= 2048 else 8 if block <= 8192 else 16}


def _num_programs(rows: int, device: torch.device) -> int:
    if interpret_mode() or device.type != "cuda":
        return max(1, min(rows, 3))  # few programs, several rows each: exercises the partial sums
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(rows, 2 * sms))


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        m, n = x2.shape
        block = next_pow2(n)
        y = alloc((m, n), dtype=x.dtype, device=x.device)
        rstd = alloc((m,), dtype=torch.float32, device=x.device)
        _fwd((m,), x2, weight, y, rstd, x2.stride(0), y.stride(0), n, eps, BLOCK=block, **_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = dy.reshape(m, n).contiguous()
        block = next_pow2(n)
        progs = _num_programs(m, x2.device)
        rows_per = triton.cdiv(m, progs)
        dx = alloc((m, n), dtype=x2.dtype, device=x2.device)
        dw_part = alloc((progs, n), dtype=torch.float32, device=x2.device)
        _bwd((progs,), dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0), dx.stride(0),
             m, n, rows_per, BLOCK=block, **_warps(block))
        return dx.reshape(ctx.shape), dw_part.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape); ``weight`` is (hidden,)."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({x.shape[-1]},)")
    if use_triton(x, weight):
        return RMSNormFunction.apply(x, weight.contiguous(), float(eps))
    return RMSNormTwin.apply(x, weight, float(eps))
