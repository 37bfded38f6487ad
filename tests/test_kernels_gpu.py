"""GPU (compiled Triton, bf16) accuracy checks; skipped cleanly without CUDA.

Criterion: max |kernel - fp64 oracle| <= 2 * max |torch bf16 - fp64 oracle| (+ a tiny floor
for outputs torch gets bit-exact), for every output and every gradient.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loom.kernels import _dispatch, apply_rope, flash_attention_with_lse, fused_linear_cross_entropy, rms_norm, swiglu
from loom.kernels import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="triton not importable"),
]
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("LOOM_KERNELS", raising=False)
    monkeypatch.setattr(_dispatch, "_backend", None)
    monkeypatch.setattr(_dispatch, "POISON_OUTPUTS", True)


def _run(fn, inputs, cot):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(outs, xs, cot)
    return [o.detach().double() for o in outs] + [g.double() for g in grads]


def _assert_within_2x(kernel_fn, torch_bf16_fn, oracle_fn, inputs, cot, floor=1e-6):
    oracle = _run(oracle_fn, [x.double() for x in inputs],
                  tuple(c.double() for c in cot) if isinstance(cot, tuple) else cot.double())
    mine = _run(kernel_fn, inputs, cot)
    base = _run(torch_bf16_fn, inputs, cot)
    for i, (m, b, o) in enumerate(zip(mine, base, oracle)):
        assert torch.isfinite(m).all(), f"tensor {i} has non-finite values"
        err, base_err = (m - o).abs().max().item(), (b - o).abs().max().item()
        assert err <= 2 * base_err + floor, f"tensor {i}: err {err:.3g} > 2 x torch-bf16 {base_err:.3g}"


def _sdpa(q, k, v, causal):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                          is_causal=causal)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s,h,kvh", [(1000, 8, 2), (257, 4, 4)])
def test_flash_attention_bf16(d, causal, s, h, kvh):
    torch.manual_seed(0)
    q = torch.randn(2, h, s, d, device="cuda", dtype=BF16)
    k = torch.randn(2, kvh, s, d, device="cuda", dtype=BF16)
    v = torch.randn(2, kvh, s, d, device="cuda", dtype=BF16)
    do = torch.randn_like(q)
    _assert_within_2x(lambda a, b, c: flash_attention_with_lse(a, b, c, causal)[0],
                      lambda a, b, c: _sdpa(a, b, c, causal),
                      lambda a, b, c: ref.attention_reference(a, b, c, causal)[0], [q, k, v], do)


def test_flash_attention_lse_gpu_matches_oracle():
    torch.manual_seed(1)
    q = torch.randn(1, 4, 300, 64, device="cuda", dtype=BF16)
    kv = torch.randn(1, 2, 300, 64, device="cuda", dtype=BF16)
    _, lse = flash_attention_with_lse(q, kv, kv, True)
    _, lse_r = ref.attention_reference(q.double(), kv.double(), kv.double(), True)
    torch.testing.assert_close(lse.double(), lse_r, atol=5e-2, rtol=1e-2)


def test_rms_norm_bf16():
    torch.manual_seed(2)
    x = torch.randn(513, 4096, device="cuda", dtype=BF16)
    w = (torch.rand(4096, device="cuda") + 0.5).to(BF16)
    dy = torch.randn_like(x)

    def eager(a, b):  # the usual torch module: fp32 statistics, bf16 output
        return (a.float() * torch.rsqrt(a.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(BF16) * b

    _assert_within_2x(lambda a, b: rms_norm(a, b, 1e-6), eager,
                      lambda a, b: ref.rms_norm_reference(a, b, 1e-6), [x, w], dy)


def test_rope_bf16():
    torch.manual_seed(3)
    b, h, kvh, s, d = 2, 8, 2, 511, 128
    q = torch.randn(b, h, s, d, device="cuda", dtype=BF16)
    k = torch.randn(b, kvh, s, d, device="cuda", dtype=BF16)
    inv = 1.0 / 500000 ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float64) / d)
    ang = torch.arange(4096, device="cuda", dtype=torch.float64)[:, None] * inv
    ang = torch.cat((ang, ang), -1)
    cos, sin = ang.cos().to(BF16), ang.sin().to(BF16)
    pos = torch.randperm(4096, device="cuda")[:s]
    cot = (torch.randn_like(q), torch.randn_like(k))

    def eager(a, c):
        cc, ss = cos[pos][None, None], sin[pos][None, None]
        rot = lambda x: torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1)  # noqa: E731
        return a * cc + rot(a) * ss, c * cc + rot(c) * ss

    _assert_within_2x(lambda a, c: apply_rope(a, c, cos, sin, pos), eager,
                      lambda a, c: ref.rope_reference(a, c, cos.double(), sin.double(), pos), [q, k], cot)


def test_swiglu_bf16():
    torch.manual_seed(4)
    g = torch.randn(4096, 1375, device="cuda", dtype=BF16) * 3
    u = torch.randn_like(g)
    _assert_within_2x(swiglu, lambda a, b: F.silu(a) * b, ref.swiglu_reference, [g, u], torch.randn_like(g))


def test_fused_linear_ce_bf16():
    torch.manual_seed(5)
    n, hdim, vocab = 2048, 512, 32000
    hidden = torch.randn(n, hdim, device="cuda", dtype=BF16)
    weight = (torch.randn(vocab, hdim, device="cuda") / math.sqrt(hdim)).to(BF16)
    targets = torch.randint(0, vocab, (n,), device="cuda")
    targets[::7] = -100
    _assert_within_2x(lambda h, w: fused_linear_cross_entropy(h, w, targets, chunk_size=512),
                      lambda h, w: F.cross_entropy(h @ w.t(), targets),
                      lambda h, w: ref.linear_cross_entropy_reference(h, w, targets),
                      [hidden, weight], torch.tensor(1.0, device="cuda"))
