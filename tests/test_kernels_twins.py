"""The memory-faithful torch twins (kernels/twins.py): what loom.kernels runs on CPU.

1. Outputs and every gradient against the float64 oracle of kernels/reference.py (plain autograd), on odd shapes,
   GQA, causal offsets, sq != sk, position ids.
2. The tensors each twin saves for backward (saved_tensors_hooks, deduplicated by storage) are exactly the set the
   Triton autograd Function saves: checked against the expected list, and against the Triton Function itself run
   in the CPU interpreter on the same inputs.
3. Layout: attention and RoPE outputs take the input's layout, so a sequence-first caller reshapes the attention
   output into the next projection's input without a copy (one storage saved, not two).
"""
from __future__ import annotations

import pytest
import torch

from loom.kernels import _dispatch, apply_rope, flash_attention_with_lse, rms_norm, swiglu
from loom.kernels import reference as ref

TOL = dict(atol=2e-5, rtol=2e-5)        # fp32 twin vs float64 oracle


@pytest.fixture(autouse=True)
def _twins(monkeypatch):
    """The twins, whatever the environment says (CPU tensors without the interpreter)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("LOOM_KERNELS", raising=False)
    monkeypatch.setattr(_dispatch, "_backend", None)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _check(fn, oracle, inputs, cotangents, tol=TOL):
    """fn on fp32 leaves vs oracle on float64 leaves: outputs and gradients of every input."""
    xs = _leaves(*inputs)
    out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(outs, xs, cotangents)
    x64 = [x.detach().double().requires_grad_() for x in inputs]
    r = oracle(*x64)
    rs = r if isinstance(r, tuple) else (r,)
    grads64 = torch.autograd.grad(rs, x64, tuple(c.double() for c in cotangents))
    for a, b in zip(outs, rs):
        torch.testing.assert_close(a.double(), b, **tol)
    for a, b in zip(grads, grads64):
        torch.testing.assert_close(a.double(), b, **tol)


# ---- 1. numerics against the float64 oracle ---------------------------------------------------------------------
@pytest.mark.parametrize("b,h,kvh,sq,sk,d,causal,offset", [
    (2, 6, 2, 13, 13, 24, True, 0),      # GQA, odd sequence and head_dim
    (1, 4, 1, 7, 19, 16, True, 12),      # MQA, bottom-right aligned (offset = sk - sq)
    (2, 3, 3, 11, 5, 8, False, 0),       # MHA, non-causal, sq > sk
    (1, 4, 2, 9, 9, 16, True, -3),       # negative offset: the first rows see no key (out 0, lse -inf)
])
def test_attention_twin_matches_oracle(b, h, kvh, sq, sk, d, causal, offset):
    g = torch.Generator().manual_seed(sq * 31 + sk)
    q, k, v = (torch.randn(b, n, s, d, generator=g) for n, s in ((h, sq), (kvh, sk), (kvh, sk)))
    dout = torch.randn(b, h, sq, d, generator=g)
    dlse = torch.randn(b, h, sq, generator=g)
    lse = ref.attention_reference(q, k, v, causal, offset)[1]
    dlse = torch.where(torch.isinf(lse), torch.zeros_like(dlse), dlse)   # no gradient through an empty row
    _check(lambda q, k, v: flash_attention_with_lse(q, k, v, causal, causal_offset=offset),
           lambda q, k, v: ref.attention_reference(q, k, v, causal, offset), (q, k, v), (dout, dlse))


def test_attention_twin_unused_lse():
    """The usual call: only `out` is used, lse gets no gradient (None reaches the backward)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g), \
        torch.randn(1, 2, 10, 8, generator=g)
    dout = torch.randn(1, 4, 10, 8, generator=g)
    _check(lambda q, k, v: flash_attention_with_lse(q, k, v, True)[0],
           lambda q, k, v: ref.attention_reference(q, k, v, True)[0], (q, k, v), (dout,))


@pytest.mark.parametrize("shape", [(7, 3, 33), (5, 48), (2, 3, 4, 17)])
def test_rms_norm_twin_matches_oracle(shape):
    g = torch.Generator().manual_seed(len(shape))
    x, w = torch.randn(*shape, generator=g), 1 + 0.1 * torch.randn(shape[-1], generator=g)
    _check(lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: ref.rms_norm_reference(x, w, 1e-5),
           (x, w), (torch.randn(*shape, generator=g),))


@pytest.mark.parametrize("pos", ["none", "1d", "2d"])
def test_rope_twin_matches_oracle(pos):
    g = torch.Generator().manual_seed(3)
    b, h, kvh, s, d = 2, 6, 2, 11, 12
    q, k = torch.randn(b, h, s, d, generator=g), torch.randn(b, kvh, s, d, generator=g)
    ang = torch.randn(40, d // 2, generator=g).repeat(1, 2)
    cos, sin = ang.cos(), ang.sin()
    ids = {"none": None, "1d": torch.randperm(40, generator=g)[:s],
           "2d": torch.randint(0, 40, (b, s), generator=g)}[pos]
    cot = (torch.randn(b, h, s, d, generator=g), torch.randn(b, kvh, s, d, generator=g))
    _check(lambda q, k: apply_rope(q, k, cos, sin, ids),
           lambda q, k: ref.rope_reference(q, k, cos.double(), sin.double(), ids), (q, k), cot)


def test_swiglu_twin_matches_oracle():
    g = torch.Generator().manual_seed(4)
    gate, up = torch.randn(3, 5, 37, generator=g) * 3, torch.randn(3, 5, 37, generator=g)
    _check(swiglu, ref.swiglu_reference, (gate, up), (torch.randn(3, 5, 37, generator=g),))


def test_bf16_twins_keep_dtypes():
    """bf16 in, bf16 out and bf16 input gradients; fp32 statistics (lse, rstd), as the kernels."""
    q = torch.randn(1, 4, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(1, 2, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    out, lse = flash_attention_with_lse(q, kv, kv, True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    w = torch.ones(16, requires_grad=True)
    y = rms_norm(out, w)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and q.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref_out = ref.attention_reference(q.detach().float(), kv.detach().float(), kv.detach().float(), True)[0]
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)


# ---- 2. saved tensors ----------------------------------------------------------------------------------------------
def _saved(fn, exclude=()):
    """{storage key: (nbytes, shape, dtype)} of every tensor saved for backward while fn runs (by storage, like
    executor/measure.py), leaving out the storages of `exclude` (parameters, buffers)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    found: dict[int, tuple[int, tuple, torch.dtype]] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            found.setdefault(s.data_ptr(), (s.nbytes(), tuple(t.shape), t.dtype))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return found, out


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _seq_first_qkv(b=2, s=10, h=4, kvh=2, d=8):
    """q, k, v as the executor makes them: views of sequence-first (s, b, heads·d) projection outputs."""
    g = torch.Generator().manual_seed(5)
    proj = [torch.randn(s, b, n * d, generator=g, requires_grad=True) for n in (h, kvh, kvh)]
    views = [p.view(s, b, n, d).permute(1, 2, 0, 3) for p, n in zip(proj, (h, kvh, kvh))]
    return proj, views


def test_attention_saves_q_k_v_out_lse_only():
    proj, (q, k, v) = _seq_first_qkv()
    found, (out, lse) = _saved(lambda: flash_attention_with_lse(q, k, v, True))
    expected = {_key(q): q.untyped_storage().nbytes(), _key(k): k.untyped_storage().nbytes(),
                _key(v): v.untyped_storage().nbytes(), _key(out): out.numel() * 4, _key(lse): lse.numel() * 4}
    assert {key: n for key, (n, _, _) in found.items()} == expected
    # K and V are kept with kv_heads heads (GQA), not expanded to the query heads
    assert found[_key(k)][0] == 2 * 10 * 2 * 8 * 4
    # out is laid out like q: back to (s, b, h·d) it is a view of the same storage, not a copy
    assert out.stride() == q.stride()
    o2 = out.permute(2, 0, 1, 3).reshape(10, 2, 32)
    assert _key(o2) == _key(out)


def test_rms_norm_saves_x_and_rstd_only():
    x = torch.randn(6, 3, 20, requires_grad=True)
    w = torch.ones(20, requires_grad=True)
    found, y = _saved(lambda: rms_norm(x * 1.0, w), exclude=(w,))
    # x*1.0 saves nothing (mul by a scalar); the norm saves its input and one fp32 rstd per row
    sizes = sorted(n for n, _, _ in found.values())
    assert sizes == sorted([18 * 4, 18 * 20 * 4])
    assert any(dt == torch.float32 and shape == (6, 3) for _, shape, dt in found.values())


def test_rope_saves_only_its_tables():
    _, (q, k, _) = _seq_first_qkv()
    cos, sin = torch.randn(10, 8), torch.randn(10, 8)
    found, (rq, rk) = _saved(lambda: apply_rope(q, k, cos, sin), exclude=(cos, sin))
    assert found == {}
    assert rq.stride() == q.stride() and rk.stride() == k.stride()      # the input's layout
    pos = torch.arange(10)
    found, _ = _saved(lambda: apply_rope(q, k, cos, sin, pos), exclude=(cos, sin))
    assert set(found) == {_key(pos)}


def test_swiglu_saves_gate_and_up_only():
    gate, up = torch.randn(4, 7, requires_grad=True), torch.randn(4, 7, requires_grad=True)
    found, _ = _saved(lambda: swiglu(gate, up))
    assert set(found) == {_key(gate), _key(up)}


@pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="triton not importable")
def test_twins_save_what_the_triton_functions_save(monkeypatch):
    """The same calls through the Triton Functions (CPU interpreter) and through the twins: the same saved set
    (bytes, elements, dtype per storage), and the same output layout (the Triton launchers use alloc_like too)."""
    def run():
        proj, (q, k, v) = _seq_first_qkv()
        g = torch.Generator().manual_seed(6)
        cos, sin = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
        w = torch.ones(8, requires_grad=True)
        rows = []

        def calls():
            rq, rk = apply_rope(q, k, cos, sin)
            out, lse = flash_attention_with_lse(rq, rk, v, True)
            y = rms_norm(out.permute(2, 0, 1, 3), w)
            z = swiglu(y, y * 2)
            rows.append((rq.stride(), out.stride()))
            return z
        found, z = _saved(calls, exclude=(cos, sin, w))
        z.sum().backward()
        # (bytes, elements, dtype) per storage: the Triton RMSNorm saves x and rstd flattened to rows
        return sorted((n, torch.Size(shape).numel(), str(dt)) for n, shape, dt in found.values()), rows, \
            proj[0].grad

    twin_saved, twin_layout, twin_grad = run()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    before = _dispatch.LAUNCHES["_attn_fwd"]
    tri_saved, tri_layout, tri_grad = run()
    assert _dispatch.LAUNCHES["_attn_fwd"] > before
    assert twin_saved == tri_saved
    assert twin_layout == tri_layout
    torch.testing.assert_close(twin_grad, tri_grad, atol=1e-4, rtol=1e-4)
