"""Loom's Triton kernels, each with a pure-torch twin (see docs/kernels.md).

Dispatch: CUDA tensors run Triton; CPU tensors run the torch twin, unless
``TRITON_INTERPRET=1`` (then the Triton source runs in the CPU interpreter).  Force the
twins with ``set_backend("torch")`` or ``LOOM_KERNELS=torch``.  Without an importable
Triton everything uses the twins.
"""
from ._dispatch import HAS_TRITON, get_backend, set_backend
from .flash_attention import (flash_attention, flash_attention_backward, flash_attention_forward,
                              flash_attention_with_lse, merge_attention_partials)
from .fused_linear_ce import fused_linear_cross_entropy
from .rmsnorm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

__all__ = [
    "HAS_TRITON",
    "get_backend",
    "set_backend",
    "flash_attention",
    "flash_attention_with_lse",
    "merge_attention_partials",
    "flash_attention_forward",
    "flash_attention_backward",
    "rms_norm",
    "apply_rope",
    "swiglu",
    "fused_linear_cross_entropy",
]
