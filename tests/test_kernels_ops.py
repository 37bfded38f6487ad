"""RMSNorm, RoPE, SwiGLU and fused linear-CE Triton kernels (CPU interpreter, fp32) vs
their torch twins and float64 oracles.  NaN-poisoned outputs; TRITON_INTERPRET=1 is set by
a module-scoped fixture (see test_kernels_flash_attention.py for why).
Tolerances (fp32): atol = rtol = 1e-5 for the elementwise/norm ops, 1e-4 for fused CE.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from loom.kernels import _dispatch, apply_rope, fused_linear_cross_entropy, rms_norm, swiglu
from loom.kernels import reference as ref

from kernel_interpreter import triton_interpreter  # noqa: F401,E402  (autouse fixture: run this module in the interpreter)

pytestmark = pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="triton not importable")
TOL = dict(atol=1e-5, rtol=1e-5)
CE_TOL = dict(atol=1e-4, rtol=1e-4)




def _grads(out, inputs, cot):
    return torch.autograd.grad(out, inputs, cot)


def _compare(fn, twin, inputs, cot, tol, launched: str):
    """Output and all input gradients of ``fn`` vs ``twin`` in fp32 and in float64."""
    before = _dispatch.LAUNCHES[launched]
    out = fn(*inputs)
    grads = _grads(out, inputs, cot)
    assert _dispatch.LAUNCHES[launched] > before, "the Triton kernel did not run"
    outs = out if isinstance(out, tuple) else (out,)
    for dtype in (torch.float32, torch.float64):
        xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
        r = twin(*xs)
        rs = r if isinstance(r, tuple) else (r,)
        gr = _grads(r, xs, tuple(c.to(dtype) for c in cot) if isinstance(cot, tuple) else cot.to(dtype))
        for a, b in zip(outs, rs):
            torch.testing.assert_close(a.to(dtype), b, **tol)
        for a, b in zip(grads, gr):
            torch.testing.assert_close(a.to(dtype), b, **tol)


# ---------------------------------------------------------------------------- RMSNorm
@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 9), lead=st.sampled_from([(), (2,)]), hidden=st.integers(1, 200),
       seed=st.integers(0, 2**16))
def test_rms_norm(rows, lead, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, rows, hidden, generator=g) * 3).requires_grad_()
    w = (torch.rand(hidden, generator=g) + 0.5).requires_grad_()
    dy = torch.randn(x.shape, generator=g)
    _compare(lambda a, b: rms_norm(a, b, 1e-5), lambda a, b: ref.rms_norm_reference(a, b, 1e-5),
             (x, w), dy, TOL, "_rms_bwd")


def test_rms_norm_weight_grad_is_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 48, generator=g, requires_grad=True)
    w = torch.randn(48, generator=g, requires_grad=True)
    dy = torch.randn(37, 48, generator=g)
    a = _grads(rms_norm(x, w), (x, w), dy)
    b = _grads(rms_norm(x, w), (x, w), dy)
    assert all(torch.equal(i, j) for i, j in zip(a, b))


# ------------------------------------------------------------------------------- RoPE
def _tables(positions: int, d: int, base: float = 10000.0):
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(positions, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos().float(), ang.sin().float()


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 2), kvh=st.integers(1, 3), group=st.sampled_from([1, 2]), s=st.integers(1, 23),
       d=st.sampled_from([2, 6, 16, 32]), pos_mode=st.sampled_from(["none", "1d", "2d"]),
       seed=st.integers(0, 2**16))
def test_rope(b, kvh, group, s, d, pos_mode, seed):
    g = torch.Generator().manual_seed(seed)
    h = kvh * group
    q = torch.randn(b, h, s, d, generator=g, requires_grad=True)
    k = torch.randn(b, kvh, s, d, generator=g, requires_grad=True)
    if pos_mode == "none":
        cos, sin = _tables(s, d)
        pos = None
    else:  # arbitrary per-token positions into a longer table (e.g. zigzag context parallel)
        cos, sin = _tables(64, d)
        shape = (s,) if pos_mode == "1d" else (b, s)
        pos = torch.randint(0, 64, shape, generator=g)
    cot = (torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g))
    _compare(lambda a, c: apply_rope(a, c, cos, sin, pos),
             lambda a, c: ref.rope_reference(a, c, cos.to(a.dtype), sin.to(a.dtype), pos),
             (q, k), cot, TOL, "_rope_kernel")


def test_rope_strided_input_and_is_a_rotation():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 7, 4, 16, generator=g).transpose(1, 2)  # (b, s, h, d) storage
    k = torch.randn(2, 7, 2, 16, generator=g).transpose(1, 2)
    cos, sin = _tables(7, 16)
    rq, rk = apply_rope(q, k, cos, sin)
    eq, ek = ref.rope_reference(q.double(), k.double(), cos.double(), sin.double())
    torch.testing.assert_close(rq.double(), eq, **TOL)
    torch.testing.assert_close(rk.double(), ek, **TOL)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1), **TOL)  # norm preserved


# ----------------------------------------------------------------------------- SwiGLU
@settings(max_examples=10, deadline=None)
@given(shape=st.lists(st.integers(1, 37), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_swiglu(shape, seed):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(*shape, generator=g) * 4).requires_grad_()
    up = torch.randn(*shape, generator=g, requires_grad=True)
    dy = torch.randn(*shape, generator=g)
    _compare(swiglu, ref.swiglu_reference, (gate, up), dy, TOL, "_swiglu_bwd")


# ----------------------------------------------------------------- fused linear + CE
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 40), hdim=st.integers(1, 24), vocab=st.integers(2, 150),
       chunk=st.sampled_from([None, 1, 7, 16]), reduction=st.sampled_from(["mean", "sum"]),
       ignore_frac=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**16))
def test_fused_linear_cross_entropy(n, hdim, vocab, chunk, reduction, ignore_frac, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hdim, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, hdim, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = -100
    targets[0] = 1  # at least one valid token, so "mean" is defined
    gout = torch.tensor(1.7)
    _compare(lambda h, w: fused_linear_cross_entropy(h, w, targets, reduction=reduction, chunk_size=chunk),
             lambda h, w: ref.linear_cross_entropy_reference(h, w, targets, reduction=reduction),
             (hidden, weight), gout, CE_TOL, "_ce_rows")


def test_fused_ce_batched_shape_custom_ignore_index_and_fp32_accumulator():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 13, 8, generator=g, requires_grad=True)
    weight = torch.randn(70, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 70, (2, 13), generator=g)
    targets[1, :5] = 3  # ignore_index=3 also drops genuine class-3 tokens, like torch
    _compare(lambda h, w: fused_linear_cross_entropy(h, w, targets, ignore_index=3, chunk_size=5,
                                                     accum_dtype=torch.float32),
             lambda h, w: ref.linear_cross_entropy_reference(h, w, targets, ignore_index=3),
             (hidden, weight), torch.tensor(1.0), CE_TOL, "_ce_rows")


def test_fused_ce_all_ignored_mean_is_nan_like_torch():
    hidden = torch.randn(4, 8)
    weight = torch.randn(10, 8)
    targets = torch.full((4,), -100)
    assert torch.isnan(fused_linear_cross_entropy(hidden, weight, targets))
    assert fused_linear_cross_entropy(hidden, weight, targets, reduction="sum").item() == 0.0
