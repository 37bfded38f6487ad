"""Pure-torch twins of every kernel: the test oracle and the CPU / no-Triton fallback.

They are written for clarity, differentiate through ordinary autograd and compute in fp32
(or float64 when given float64, which is how the tests build their high-precision
reference), casting results back to the input dtype like the kernels do.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _without_autocast(fn):
    """Attention computes in its accumulation dtype, as the kernels do: under autocast (the executor runs bf16
    autocast on CPU too) the upcast operands of its matmuls would be cast back to bf16, giving bf16 scores and a
    bf16 lse where FlashAttention keeps fp32."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(*args, **kwargs)
    return run


@_without_autocast
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        causal_offset: int = 0, softmax_scale: float | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention returning ``(out, lse)``; layout (batch, heads, seq, head_dim).

    GQA without repeating K/V: q is viewed as (b, kv_heads, group, s, d) and broadcast
    against k/v of shape (b, kv_heads, 1, s, d).  Query ``i`` sees key ``j`` iff
    ``j <= i + causal_offset`` when ``causal``.  Rows that see no key give out=0, lse=-inf.
    """
    b, h, sq, d = q.shape
    kvh, sk = k.shape[1], k.shape[2]
    assert h % kvh == 0, "heads must be a multiple of kv_heads"
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    acc = _acc(q.dtype)
    qg = q.to(acc).reshape(b, kvh, h // kvh, sq, d)
    kg, vg = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)
    s = torch.matmul(qg, kg.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + causal_offset, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.matmul(p, vg)
    return out.reshape(b, h, sq, d).to(q.dtype), lse.reshape(b, h, sq)


@_without_autocast
def attention_backward_reference(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, causal: bool = True,
                                 causal_offset: int = 0, softmax_scale: float | None = None,
                                 dlse: torch.Tensor | None = None,
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA2 backward from saved (out, lse) (Dao 2023, Alg. 2), written with plain matmuls.

    P = exp(S - lse); dV = P^T dO; dS = P * (dO V^T - delta), delta = rowsum(dO * O) - dlse;
    dQ = scale * dS K; dK = scale * dS^T Q.  GQA gradients are summed over each group.
    """
    b, h, sq, d = q.shape
    kvh, sk = k.shape[1], k.shape[2]
    g = h // kvh
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    acc = _acc(q.dtype)
    qg = q.to(acc).reshape(b, kvh, g, sq, d)
    dog = dout.to(acc).reshape(b, kvh, g, sq, d)
    kg, vg = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)
    lse_g = lse.to(acc).reshape(b, kvh, g, sq)
    lse_g = torch.where(torch.isinf(lse_g), torch.full_like(lse_g, float("inf")), lse_g)
    s = torch.matmul(qg, kg.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + causal_offset, float("-inf"))
    p = torch.exp(s - lse_g[..., None])
    delta = (dout.to(acc) * out.to(acc)).sum(-1).reshape(b, kvh, g, sq)
    if dlse is not None:
        delta = delta - dlse.to(acc).reshape(b, kvh, g, sq)
    dv = torch.matmul(p.transpose(-1, -2), dog).sum(2)
    ds = p * (torch.matmul(dog, vg.transpose(-1, -2)) - delta[..., None])
    dq = torch.matmul(ds, kg) * scale
    dk = (torch.matmul(ds.transpose(-1, -2), qg) * scale).sum(2)
    return dq.reshape(b, h, sq, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim (Zhang & Sennrich 2019)."""
    acc = _acc(x.dtype)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(acc)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, seq_len: int,
                position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cos/sin of shape (batch or 1, 1, seq, head_dim) for broadcasting."""
    if position_ids is None:
        c, s_ = cos[:seq_len], sin[:seq_len]
        return c[None, None], s_[None, None]
    pos = position_ids if position_ids.dim() == 2 else position_ids[None]
    return cos[pos][:, None], sin[pos][:, None]


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama rotate-half RoPE (Su et al., RoFormer): x*cos + rotate_half(x)*sin."""
    c, s_ = rope_tables(cos, sin, q.shape[2], position_ids)
    acc = _acc(q.dtype)
    c, s_ = c.to(acc), s_.to(acc)

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.to(acc)
        return (xf * c + _rotate_half(xf) * s_).to(x.dtype)

    return rot(q), rot(k)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Shazeer 2020, GLU variants)."""
    acc = _acc(gate.dtype)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor,
                                   targets: torch.Tensor, ignore_index: int = -100,
                                   reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets); materialises the full logits."""
    acc = _acc(hidden.dtype)
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    return F.cross_entropy(logits.to(acc), targets.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)
