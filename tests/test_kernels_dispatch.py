"""Backend dispatch of loom.kernels: twin vs Triton selection, forcing, and the no-Triton path."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import loom.kernels as K
from loom.kernels import _dispatch


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("LOOM_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_dispatch, "_backend", None)


def _run_all_ops() -> None:
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    kv = torch.randn(1, 1, 5, 16, requires_grad=True)
    out = K.flash_attention(q, kv, kv)
    cos, sin = torch.ones(5, 16), torch.zeros(5, 16)
    rq, rk = K.apply_rope(q, kv, cos, sin)
    y = K.swiglu(K.rms_norm(out, torch.ones(16)), rq)
    loss = K.fused_linear_cross_entropy(y.reshape(-1, 16), torch.randn(7, 16), torch.zeros(10, dtype=torch.long))
    (loss + rk.sum()).backward()
    assert q.grad is not None and kv.grad is not None


def _launches() -> int:
    return sum(_dispatch.LAUNCHES.values())


def test_cpu_without_interpreter_uses_twins():
    before = _launches()
    _run_all_ops()
    assert _launches() == before


@pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="triton not importable")
@pytest.mark.parametrize("how", ["set_backend", "env"])
def test_forcing_torch_overrides_interpreter(monkeypatch, how):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if how == "env":
        monkeypatch.setenv("LOOM_KERNELS", "torch")
    else:
        K.set_backend("torch")
    before = _launches()
    _run_all_ops()
    assert _launches() == before
    assert K.get_backend() == "torch"


@pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="triton not importable")
def test_interpreter_runs_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    before = dict(_dispatch.LAUNCHES)
    _run_all_ops()
    for name in ("_attn_fwd", "_attn_bwd_dkdv", "_rope_kernel", "_rms_fwd", "_swiglu_bwd", "_ce_rows"):
        assert _dispatch.LAUNCHES[name] > before.get(name, 0), name


def test_forcing_triton_on_plain_cpu_raises():
    K.set_backend("triton")
    with pytest.raises(RuntimeError, match="triton"):
        K.swiglu(torch.randn(3), torch.randn(3))


def test_bad_backend_names():
    with pytest.raises(ValueError):
        K.set_backend("cuda")


def _subprocess(code: str, **env: str) -> None:
    """Run ``code`` in a fresh interpreter that can ``import test_kernels_dispatch as t``."""
    code = f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n" + textwrap.dedent(code)
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LOOM_KERNELS")}
    full_env.update(env)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=full_env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_without_triton_everything_falls_back():
    _subprocess("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import pytest, torch
        import loom.kernels as K
        assert not K.HAS_TRITON
        import test_kernels_dispatch as t
        t._run_all_ops()
        K.set_backend("triton")
        with pytest.raises(RuntimeError, match="not importable"):
            K.swiglu(torch.randn(3), torch.randn(3))
    """, TRITON_INTERPRET="1")


@pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="triton not importable")
def test_interpreter_set_before_triton_import():
    """The other import order from the test modules: TRITON_INTERPRET=1 for the whole process."""
    _subprocess("""
        import torch
        import loom.kernels as K
        from loom.kernels import _dispatch
        import test_kernels_dispatch as t
        t._run_all_ops()
        assert _dispatch.LAUNCHES["_attn_bwd_dq"] > 0
    """, TRITON_INTERPRET="1")
