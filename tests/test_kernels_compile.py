"""Compile every Triton kernel for Hopper (sm_90, bf16) without a GPU.

The CPU interpreter accepts code the real compiler rejects (and vice versa), so this runs
Triton's full pipeline down to ptxas for one representative configuration of each kernel.
It needs no CUDA device, only Triton's bundled NVIDIA backend.
"""
from __future__ import annotations

import importlib
import inspect

import pytest

from loom.kernels import _dispatch

pytestmark = pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="triton not importable")

_FA = {n: "*bf16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")} | {"LSE": "*fp32", "DELTA": "*fp32", "DLSE": "*fp32"}
_FA_META = dict(CAUSAL=True, HEAD_DIM=128, BLOCK_D=128, DOT_PREC="tf32")
CASES = {
    "attn_fwd": ("flash_attention_fwd", "_attn_fwd", _FA, _FA_META | dict(BLOCK_M=128, BLOCK_N=64), ("qk_scale",), 8),
    "attn_bwd_pre": ("flash_attention_bwd", "_attn_bwd_preprocess", _FA,
                     dict(HAS_DLSE=True, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=64), (), 4),
    "attn_bwd_dkdv": ("flash_attention_bwd", "_attn_bwd_dkdv", _FA, _FA_META | dict(BLOCK_M=64, BLOCK_N=128), ("sm_scale",), 8),
    "attn_bwd_dq": ("flash_attention_bwd", "_attn_bwd_dq", _FA, _FA_META | dict(BLOCK_M=128, BLOCK_N=64), ("sm_scale",), 8),
    "rms_fwd": ("rmsnorm", "_rms_fwd", {"X": "*bf16", "W": "*bf16", "Y": "*bf16", "RSTD": "*fp32"},
                dict(BLOCK=4096), ("eps",), 8),
    "rms_bwd": ("rmsnorm", "_rms_bwd", {"DY": "*bf16", "X": "*bf16", "W": "*bf16", "RSTD": "*fp32", "DX": "*bf16",
                                        "DW_PART": "*fp32"}, dict(BLOCK=4096), (), 8),
    "rope": ("rope", "_rope_kernel", {n: "*bf16" for n in ("Q", "K", "OQ", "OK", "COS", "SIN")} | {"POS": "*i64"},
             dict(HAS_POS=True, BACKWARD=True, HALF=64, BLOCK_HALF=64, BLOCK_HQ=32, BLOCK_HK=8), (), 4),
    "swiglu_bwd": ("swiglu", "_swiglu_bwd", {n: "*bf16" for n in ("DY", "G", "U", "DG", "DU")}, dict(BLOCK=1024), (), 4),
    "ce_rows": ("fused_linear_ce", "_ce_rows", {"LOGITS": "*bf16", "TARGETS": "*i64", "LOSS": "*fp32", "SCALE": "*fp32"},
                dict(BLOCK_V=4096), (), 16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiles_for_sm90(case, monkeypatch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    import triton.language as tl

    if not isinstance(tl.zeros, JITFunction):  # triton was imported with TRITON_INTERPRET=1
        pytest.skip("triton's library was bound to the interpreter at import")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    module, name, ptrs, constexprs, floats, warps = CASES[case]
    fn = getattr(importlib.import_module(f"loom.kernels.{module}"), name)
    sig = {p: "constexpr" if p in constexprs else ptrs.get(p, "fp32" if p in floats else "i32")
           for p in inspect.signature(fn).parameters}
    try:
        kernel = triton.compile(ASTSource(triton.jit(fn), sig, constexprs), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": warps, "num_stages": 3, "enable_fp_fusion": True})
    except RuntimeError as e:  # only a missing toolchain is a skip; compile errors must fail
        if "ptxas" in str(e).lower() and "not found" in str(e).lower():
            pytest.skip(str(e))
        raise
    assert kernel.metadata.shared <= 232448  # H100 max dynamic shared memory per block
