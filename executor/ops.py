"""The model's hot ops behind one module: loom.kernels when it provides them, small torch functions otherwise.

Every op here has the same signature as its loom.kernels counterpart (see kernels/reference.py) so the switch is a
lookup, not a rewrite. loom.kernels itself sends CPU tensors to its torch twins, which save for backward what the GPU
kernels save (kernels/twins.py), so parity and memory checks on CPU compare like with like. `LOOM_EXECUTOR_KERNELS=torch` forces the local functions (used by the plain-PyTorch GPU baseline).
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.nn.functional as F


def _kernel(name: str) -> Callable | None:
    """The loom.kernels entry point `name`, or None while that kernel has not landed."""
    if os.environ.get("LOOM_EXECUTOR_KERNELS", "auto") == "torch":
        return None
    try:
        import loom.kernels as K
    except Exception:       # kernels are optional for the executor: fall back to the local functions
        return None
    return getattr(K, name, None)


# ---- norms ---------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""
    k = _kernel("rms_norm")
    if k is not None:
        return k(x, weight, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm (Ba et al. 2016), GPT-2 style."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


# ---- rotary position embedding -------------------------------------------------------------------------------
def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (seq, head_dim) for rotate-half RoPE (Su et al. 2021, RoFormer §3.4.2; Llama's layout)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv)
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos().float(), ang.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k of layout (batch, heads, seq, head_dim) by their positions (rows of cos/sin)."""
    kern = _kernel("apply_rope")
    if kern is not None:
        return kern(q, k, cos, sin, position_ids)
    s = q.shape[2]
    c = (cos[:s] if position_ids is None else cos[position_ids])
    sn = (sin[:s] if position_ids is None else sin[position_ids])
    c, sn = c.view(1, 1, s, -1) if position_ids is None else c[:, None], \
        sn.view(1, 1, s, -1) if position_ids is None else sn[:, None]

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * c + _rotate_half(xf) * sn).to(x.dtype)
    return rot(q), rot(k)


# ---- attention -----------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Softmax attention, layout (batch, heads, seq, head_dim); k, v may have fewer heads (GQA, Ainslie et al.
    2023): each group of heads // kv_heads query heads shares one KV head."""
    kern = _kernel("flash_attention")
    if kern is not None:
        return kern(q, k, v, causal=causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


# ---- MLP activations -----------------------------------------------------------------------------------------
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Shazeer 2020, GLU variants §2)."""
    kern = _kernel("swiglu")
    if kern is not None:
        return kern(gate, up)
    return F.silu(gate) * up


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-approximated GELU (Hendrycks & Gimpel 2016)."""
    return F.gelu(x, approximate="tanh")


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def fused_linear_cross_entropy() -> Callable | None:
    """loom.kernels' chunked linear + cross-entropy (hidden, weight, targets, reduction="sum"), if present."""
    return _kernel("fused_linear_cross_entropy")
