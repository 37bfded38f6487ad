"""Flash attention (Triton, run by the CPU interpreter) vs its torch twin and a float64 oracle.

TRITON_INTERPRET=1 is set by a module-scoped fixture rather than at import: loom.kernels
reads it at each launch, and a process-wide setting would push other modules' CPU calls
through the (slow) interpreter.  Output buffers are NaN-poisoned.
Tolerances (fp32, interpreter): atol = rtol = 1e-4 against both oracles.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from loom.kernels import _dispatch, flash_attention, flash_attention_with_lse, merge_attention_partials
from loom.kernels.reference import attention_reference

from kernel_interpreter import triton_interpreter  # noqa: F401,E402  (autouse fixture: run this module in the interpreter)

pytestmark = pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="triton not importable")
TOL = dict(atol=1e-4, rtol=1e-4)




def _grads(outs, inputs, cotangents):
    gs = torch.autograd.grad(outs, inputs, cotangents, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)]


def _check_against_oracles(b, h, kvh, sq, sk, d, causal, offset, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g, requires_grad=True)
    k = torch.randn(b, kvh, sk, d, generator=g, requires_grad=True)
    v = torch.randn(b, kvh, sk, d, generator=g, requires_grad=True)
    before = _dispatch.LAUNCHES["_attn_fwd"], _dispatch.LAUNCHES["_attn_bwd_dq"]
    out, lse = flash_attention_with_lse(q, k, v, causal, causal_offset=offset)
    dout = torch.randn(out.shape, generator=g)
    dlse = torch.randn(lse.shape, generator=g)
    dlse = torch.where(torch.isinf(lse), torch.zeros_like(dlse), dlse)
    grads = _grads((out, lse), (q, k, v), (dout, dlse))
    assert (_dispatch.LAUNCHES["_attn_fwd"], _dispatch.LAUNCHES["_attn_bwd_dq"]) > before  # Triton ran

    for dtype, tol in ((torch.float32, TOL), (torch.float64, TOL)):
        qr, kr, vr = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
        out_r, lse_r = attention_reference(qr, kr, vr, causal, offset)
        grads_r = _grads((out_r, lse_r), (qr, kr, vr), (dout.to(dtype), dlse.to(dtype)))
        torch.testing.assert_close(out.to(dtype), out_r, **tol)
        torch.testing.assert_close(lse.to(dtype), lse_r, **tol)  # -inf rows must match too
        for a, r in zip(grads, grads_r):
            torch.testing.assert_close(a.to(dtype), r, **tol)


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), kvh=st.integers(1, 2), group=st.sampled_from([1, 2, 3]),
       s=st.integers(1, 70), d=st.sampled_from([16, 24, 32, 64]), causal=st.booleans(),
       seed=st.integers(0, 2**16))
def test_self_attention_matches_oracles(b, kvh, group, s, d, causal, seed):
    _check_against_oracles(b, kvh * group, kvh, s, s, d, causal, 0, seed)


@pytest.mark.parametrize("sq,sk,offset,causal", [
    (20, 45, 25, True),    # bottom-right aligned (decode-style suffix of queries)
    (45, 20, -25, True),   # first 25 rows see no key: out 0, lse -inf
    (17, 50, 0, True),
    (33, 9, 0, False),
])
def test_cross_lengths_and_offsets(sq, sk, offset, causal):
    _check_against_oracles(1, 4, 2, sq, sk, 16, causal, offset)


def test_head_dim_128_and_mqa():
    _check_against_oracles(1, 3, 1, 40, 40, 128, True, 0)


def test_public_wrapper_and_noncontiguous_input():
    g = torch.Generator().manual_seed(1)
    # (b, s, h, d) storage viewed as (b, h, s, d): strided, last dim contiguous.
    q = torch.randn(2, 29, 4, 32, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 29, 2, 32, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 29, 2, 32, generator=g).transpose(1, 2).requires_grad_()
    out = flash_attention(q, k, v)  # causal by default
    out_lse = flash_attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out_lse, tuple) and torch.equal(out_lse[0], out)
    ref, _ = attention_reference(q.double(), k.double(), v.double(), True)
    torch.testing.assert_close(out.double(), ref, **TOL)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_backward_is_deterministic():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 45, 16, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 45, 16, generator=g, requires_grad=True)
    v = torch.randn(1, 1, 45, 16, generator=g, requires_grad=True)
    dout = torch.randn(1, 4, 45, 16, generator=g)
    first = _grads(flash_attention(q, k, v), (q, k, v), dout)
    second = _grads(flash_attention(q, k, v), (q, k, v), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("chunks", [2, 3, 4])
def test_ring_attention_blocks_merge_to_full_causal(chunks):
    """Context-parallel building block: per-chunk diagonal (causal) and past (full) blocks,
    merged by lse, equal full causal attention in value and in gradient."""
    g = torch.Generator().manual_seed(chunks)
    b, h, kvh, c, d = 1, 4, 2, 19, 16
    s = c * chunks
    q = torch.randn(b, h, s, d, generator=g, requires_grad=True)
    k = torch.randn(b, kvh, s, d, generator=g, requires_grad=True)
    v = torch.randn(b, kvh, s, d, generator=g, requires_grad=True)
    outs = []
    for i in range(chunks):
        qi = q[:, :, i * c:(i + 1) * c]
        out, lse = flash_attention_with_lse(qi, k[:, :, i * c:(i + 1) * c], v[:, :, i * c:(i + 1) * c], True)
        for j in range(i):  # remote, fully visible past blocks
            o_j, l_j = flash_attention_with_lse(qi, k[:, :, j * c:(j + 1) * c], v[:, :, j * c:(j + 1) * c], False)
            out, lse = merge_attention_partials(out, lse, o_j, l_j)
        outs.append(out)
    merged = torch.cat(outs, dim=2)
    dout = torch.randn(merged.shape, generator=g)
    grads = _grads(merged, (q, k, v), dout)

    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = attention_reference(qr, kr, vr, True)
    grads_r = _grads(ref, (qr, kr, vr), dout.double())
    torch.testing.assert_close(merged.double(), ref, **TOL)
    for a, r in zip(grads, grads_r):
        torch.testing.assert_close(a.double(), r, **TOL)


def test_merge_handles_empty_side():
    out = torch.randn(1, 1, 3, 4)
    lse = torch.randn(1, 1, 3)
    m_out, m_lse = merge_attention_partials(out, lse, torch.zeros_like(out), torch.full_like(lse, float("-inf")))
    torch.testing.assert_close(m_out, out)
    torch.testing.assert_close(m_lse, lse)


def test_rejects_bad_shapes():
    q = torch.randn(1, 3, 8, 16)
    kv = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError):
        flash_attention(q, kv, kv)


@pytest.mark.parametrize("use_twin", [False, True])
def test_ring_backward_with_merged_statistics(use_twin, monkeypatch):
    """The ring-attention backward trick: each (q chunk, kv chunk) block's gradients come from
    flash_attention_backward given the merged out / lse / dout — no per-block outputs kept.
    Run on the Triton kernels and on the torch twin (the CPU fallback the executor uses)."""
    from loom.kernels import flash_attention_backward, flash_attention_forward

    if use_twin:
        monkeypatch.setattr(_dispatch, "_backend", "torch")
    g = torch.Generator().manual_seed(7)
    b, h, kvh, c, d, n = 2, 4, 2, 13, 16, 3
    q = torch.randn(b, h, c * n, d, generator=g)
    k = torch.randn(b, kvh, c * n, d, generator=g)
    v = torch.randn(b, kvh, c * n, d, generator=g)
    dout = torch.randn(q.shape, generator=g)
    chunk = lambda t, i: t[:, :, i * c:(i + 1) * c]  # noqa: E731
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i in range(n):
        out, lse = flash_attention_forward(chunk(q, i), chunk(k, i), chunk(v, i), True)
        for j in range(i):
            o_j, l_j = flash_attention_forward(chunk(q, i), chunk(k, j), chunk(v, j), False)
            out, lse = merge_attention_partials(out, lse, o_j, l_j)
        for j in range(i + 1):
            gq, gk, gv = flash_attention_backward(chunk(dout, i), chunk(q, i), chunk(k, j), chunk(v, j),
                                                  out, lse, causal=(i == j))
            chunk(dq, i).add_(gq)
            chunk(dk, j).add_(gk)
            chunk(dv, j).add_(gv)
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    ref, _ = attention_reference(qr, kr, vr, True)
    for a, r in zip((dq, dk, dv), _grads(ref, (qr, kr, vr), dout.double())):
        torch.testing.assert_close(a.double(), r, **TOL)


@pytest.mark.parametrize("sq,sk,offset", [(11, 11, 0), (9, 20, 11), (20, 9, -6)])
def test_backward_twin_matches_autograd(sq, sk, offset):
    """attention_backward_reference (the CPU twin of flash_attention_backward), dlse included."""
    from loom.kernels.reference import attention_backward_reference

    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 4, sq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, sk, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, sk, 8, generator=g, dtype=torch.float64, requires_grad=True)
    out, lse = attention_reference(q, k, v, True, offset)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).masked_fill(torch.isinf(lse), 0)
    expected = _grads((out, lse), (q, k, v), (dout, dlse))
    got = attention_backward_reference(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                                       True, offset, dlse=dlse)
    for a, r in zip(got, expected):
        torch.testing.assert_close(a, r)
