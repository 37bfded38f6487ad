"""Single-process checks of the executor's parts against independent implementations."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loom.executor.data import EOS, Batches, Shards, TokenData, decode, encode
from loom.executor.model import BuildCtx, Decoder
from loom.executor.optim import FlatAdamW, LossScaler, clip_, global_grad_norm, lr_at, wsd_decay_start
from loom.spec import ModelSpec, SpecError, spec_from_dict
from loom.spec.run import DataSpec


# ---- optimizer -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,ref,fused", [("adamw", torch.optim.AdamW, True), ("adamw", torch.optim.AdamW, False),
                                            ("adam", torch.optim.Adam, None), ("sgd", torch.optim.SGD, None)])
def test_flat_optimizer_matches_torch(kind, ref, fused):
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(37, generator=g)
    grads = [torch.randn(37, generator=g) for _ in range(5)]
    mine = p0.clone()
    opt = FlatAdamW([mine], [torch.ones(37, dtype=torch.bool)], kind, (0.9, 0.95), 1e-8, weight_decay=0.1,
                    fused=fused)
    assert opt.fused == bool(fused)
    theirs = torch.nn.Parameter(p0.clone())
    kw = dict(momentum=0.9, weight_decay=0.1) if kind == "sgd" else dict(betas=(0.9, 0.95), eps=1e-8,
                                                                          weight_decay=0.1)
    topt = ref([theirs], lr=1e-2, **kw)
    for gr in grads:
        opt.step([gr.clone()], 1e-2)
        theirs.grad = gr.clone()
        topt.step()
    torch.testing.assert_close(mine, theirs.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [True, False])
def test_weight_decay_mask_skips_masked_elements(fused):
    p = torch.ones(4)
    opt = FlatAdamW([p], [torch.tensor([True, False, True, False])], "adamw", weight_decay=0.5, fused=fused)
    opt.step([torch.zeros(4)], 0.1)                 # zero gradient: only decay moves the parameter
    assert p.tolist() == pytest.approx([0.95, 1.0, 0.95, 1.0])


def test_fused_adamw_equals_the_op_by_op_form_with_mixed_masks():
    """Several flat tensors, decay masks all, none and mixed, 5 steps: the fused path (the default) agrees with
    the op-by-op reference to fp32 rounding."""
    g = torch.Generator().manual_seed(1)
    shapes, masks = [64, 33, 50], [torch.ones(64, dtype=torch.bool), torch.zeros(33, dtype=torch.bool),
                                   torch.arange(50) % 3 == 0]
    p0 = [torch.randn(n, generator=g) for n in shapes]
    a, b = [x.clone() for x in p0], [x.clone() for x in p0]
    fa, fb = FlatAdamW(a, masks, "adamw", fused=True), FlatAdamW(b, masks, "adamw", fused=False)
    for t in range(5):
        grads = [torch.randn(n, generator=g) for n in shapes]
        fa.step([x.clone() for x in grads], 1e-2 * (t + 1))
        fb.step([x.clone() for x in grads], 1e-2 * (t + 1))
    for x, y, x0 in zip(a, b, p0):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        assert not torch.equal(x, x0)


# ---- schedules ---------------------------------------------------------------------------------------------------
def test_cosine_schedule_shape():
    lr, mn, total, warm = 1.0, 0.1, 110, 10
    assert lr_at(0, total, lr, mn, "cosine", warm, 0) == pytest.approx(0.1)        # linear warmup from lr/warmup
    assert lr_at(9, total, lr, mn, "cosine", warm, 0) == pytest.approx(1.0)
    assert lr_at(10, total, lr, mn, "cosine", warm, 0) == pytest.approx(1.0)
    assert lr_at(60, total, lr, mn, "cosine", warm, 0) == pytest.approx(0.55)       # half way: the mean
    assert lr_at(110, total, lr, mn, "cosine", warm, 0) == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_linear_to_min():
    total, warm, frac = 100, 5, 0.2
    start = wsd_decay_start(total, warm, frac)
    assert start == 80
    assert all(lr_at(s, total, 1.0, 0.0, "wsd", warm, frac) == 1.0 for s in range(warm, start))
    decay = [lr_at(s, total, 1.0, 0.0, "wsd", warm, frac) for s in range(start, total)]
    assert decay[-1] == pytest.approx(0.0) and np.allclose(np.diff(decay), -1 / 20)


# ---- clipping and loss scaling -----------------------------------------------------------------------------------
def test_global_norm_and_clip_match_torch():
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(10, generator=g), torch.randn(7, generator=g)]
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
    for p, x in zip(params, grads):
        p.grad = x.clone()
    ref = torch.nn.utils.clip_grad_norm_(params, 1.0)
    mine = [x.clone() for x in grads]
    norm = global_grad_norm(mine, [torch.ones_like(x, dtype=torch.bool) for x in mine], [])
    clip_(mine, norm, 1.0)
    assert float(norm) == pytest.approx(float(ref), rel=1e-6)
    for p, x in zip(params, mine):
        torch.testing.assert_close(x, p.grad, rtol=1e-5, atol=1e-7)
    # A masked (TP-duplicate) element is left out of the norm.
    only_first = global_grad_norm(grads, [torch.ones(10, dtype=torch.bool), torch.zeros(7, dtype=torch.bool)], [])
    assert float(only_first) == pytest.approx(float(grads[0].norm()), rel=1e-6)


def test_loss_scaler_halves_on_overflow_and_grows():
    s = LossScaler(scale=8.0, growth_interval=2)
    assert s.found_inf([torch.tensor([1.0, float("inf")])], [])
    s.update(True)
    assert s.scale == 4.0
    s.update(False)
    s.update(False)
    assert s.scale == 8.0


# ---- the model against an independent plain-PyTorch forward ------------------------------------------------------
def _rope_complex(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE in the rotate-half layout written with complex numbers: pairs (i, i + d/2) rotate by pos·θ^(-2i/d)."""
    b, h, s, d = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(s, d // 2, dtype=torch.float64), torch.outer(torch.arange(s, dtype=torch.float64), freqs))
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * rot
    return torch.cat((z.real, z.imag), dim=-1).float()


def _triton_interpreter(monkeypatch, on: bool) -> None:
    """Run loom.kernels' Triton sources in the CPU interpreter (how the GPU path is exercised here)."""
    if on:
        from loom.kernels import HAS_TRITON
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("recompute,interpret", [("none", False), ("full", False), ("none", True)])
def test_decoder_loss_matches_plain_pytorch(recompute, interpret, monkeypatch):
    _triton_interpreter(monkeypatch, interpret)
    from loom.kernels._dispatch import LAUNCHES
    before = sum(LAUNCHES.values())
    m = ModelSpec(layers=2, hidden=32, heads=4, kv_heads=2, ffn_hidden=48, vocab=257, seq_len=12, rope_theta=1e4)
    model = Decoder(BuildCtx(m, recompute=recompute, seed=3))
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(0))
    tgt = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(1))
    loss = model.token_losses(model(ids), tgt).mean().detach()
    assert (sum(LAUNCHES.values()) > before) == interpret          # the Triton sources ran, or the twins did

    P = dict(model.named_parameters())
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.norm_eps) * w
    x = F.embedding(ids, P["embed.weight"])                                      # (b, s, h)
    for i in range(m.layers):
        L = lambda n: P[f"layers.{i}.{n}"]
        h = rms(x, L("norm1.weight"))
        q = (h @ L("attn.q.weight").T).view(2, 12, 4, 8).transpose(1, 2)
        k = (h @ L("attn.k.weight").T).view(2, 12, 2, 8).transpose(1, 2)
        v = (h @ L("attn.v.weight").T).view(2, 12, 2, 8).transpose(1, 2)
        q, k = _rope_complex(q, m.rope_theta), _rope_complex(k, m.rope_theta)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)    # GQA: 2 query heads per KV head
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
        scores = scores.masked_fill(torch.triu(torch.ones(12, 12, dtype=torch.bool), 1), float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 12, 32)
        x = x + a @ L("attn.o.weight").T
        h = rms(x, L("norm2.weight"))
        x = x + (F.silu(h @ L("mlp.gate.weight").T) * (h @ L("mlp.up.weight").T)) @ L("mlp.down.weight").T
    logits = rms(x, P["norm.weight"]) @ P["head_weight"].T
    ref = F.cross_entropy(logits.reshape(-1, 257), tgt.reshape(-1))
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert abs(float(ref.detach()) - math.log(257)) < 0.2               # a fresh model is near uniform


# ---- data ----------------------------------------------------------------------------------------------------------
def test_byte_tokenizer_round_trip():
    text = "def f(x):\n    return x  # é"
    ids = encode(text)
    assert ids.max() < EOS and decode(list(ids) + [EOS]) == text


def test_stdlib_corpus_is_real_text_and_deterministic(tmp_path):
    d = DataSpec(cache_dir=str(tmp_path))
    a, b = TokenData(d, 64, 0, 257), TokenData(d, 64, 0, 257)
    assert a.sources["stdlib_code"].tokens > 1_000_000
    seq = a.sequence(17)
    assert seq.shape == (65,) and np.array_equal(seq, b.sequence(17))
    assert not np.array_equal(seq, TokenData(d, 64, 1, 257).sequence(17))   # the seed shuffles
    printable = np.isin(seq, list(range(32, 127)) + [9, 10, EOS]).mean()
    assert printable > 0.9                                                    # source code, not random bytes


def test_dp_ranks_partition_the_global_batch(tmp_path):
    d = TokenData(DataSpec(cache_dir=str(tmp_path)), 16, 0, 257)
    whole = Batches(d, 8, 8, 1, 0, torch.device("cpu")).micro_batches(consumed=24)[0][0]
    parts = [torch.cat([x for x, _ in Batches(d, 8, 2, 2, r, torch.device("cpu")).micro_batches(consumed=24)])
             for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)
    x, y = Batches(d, 8, 8, 1, 0, torch.device("cpu")).micro_batches(0)[0]
    assert torch.equal(x[:, 1:], y[:, :-1])                                   # targets are inputs shifted by one


def test_user_shards_and_decay_mixture(tmp_path):
    shard = tmp_path / "mine"
    shard.mkdir()
    np.arange(1000, 1000 + 5000, dtype="<u4").tofile(shard / "a.bin")
    np.arange(6000, 6000 + 3000, dtype="<u4").tofile(shard / "b.bin")
    (shard / "meta.json").write_text(json.dumps({"dtype": "uint32", "vocab_size": 9000, "eos_id": 0}))
    s = Shards.open(shard)
    assert s.tokens == 8000 and list(s.read(4998, 4)) == [5998, 5999, 6000, 6001]   # across the file boundary
    d = TokenData(DataSpec(mixture={str(shard): 1.0}, decay_mixture={"stdlib_docs": 1.0}, cache_dir=str(tmp_path)),
                  32, 0, 9000)
    assert d.sequence(3, decay=False).min() >= 1000
    assert d.sequence(3, decay=True).max() <= EOS
    with pytest.raises(ValueError, match="model.vocab"):
        TokenData(DataSpec(mixture={str(shard): 1.0}), 32, 0, 257)


# ---- spec additions ----------------------------------------------------------------------------------------------
def _spec(**extra) -> dict:
    d = {"model": {"layers": 1, "hidden": 16, "heads": 2, "ffn_hidden": 32, "vocab": 257, "seq_len": 8},
         "cluster": {"gpu": "cpu", "gpus_per_node": 1}, "training": {"global_batch": 2, "precision": "fp32"},
         "parallel": {"dp": 1}}
    d.update(extra)
    return d


def test_data_and_run_tables_validate_with_named_fixes(tmp_path):
    s = spec_from_dict(_spec(data={"mixture": {"stdlib_docs": 1.0}}, run={"steps": 3, "checkpoint_every": 1}))
    assert s.run.steps == 3 and s.data.mixture == {"stdlib_docs": 1.0}
    with pytest.raises(SpecError) as e:
        spec_from_dict(_spec(data={"mixture": {str(tmp_path / "nope"): 1.0}}))
    assert any(f.startswith("data.mixture") for f in e.value.fields())
    with pytest.raises(SpecError) as e:
        spec_from_dict(_spec(data={"decay_mixture": {"stdlib_docs": 1.0}}))
    assert "data.decay_mixture" in e.value.fields() and "wsd" in str(e.value)
    small = _spec(data={})
    small["model"]["vocab"] = 100
    with pytest.raises(SpecError) as e:
        spec_from_dict(small)
    assert "model.vocab" in e.value.fields()
    with pytest.raises(SpecError) as e:
        spec_from_dict(_spec(run={"step": 3}))
    assert "run.step" in e.value.fields()


def test_trainer_runs_the_plan_program_and_times_each_op():
    from loom.executor.mesh import build_mesh
    from loom.executor.trainer import Trainer
    spec = spec_from_dict(_spec(training={"global_batch": 4, "micro_batch": 2, "precision": "fp32"}))
    tr = Trainer(spec, build_mesh(spec.plan, "cpu"), torch.device("cpu"), steps=2, profile=True)
    s1 = tr.step()
    assert [k for _, k, _, _ in tr.op_times] == [op.kind.value for op in tr.program]
    assert [k for _, k, _, _ in tr.op_times].count("forward") == spec.micro_batches == 2
    assert all(t >= 0 for *_, t in tr.op_times)
    s2 = tr.step()
    assert s2.step == 2 and s2.loss < s1.loss and tr.consumed == 8


@pytest.mark.parametrize("interpret", [False, True])
def test_fused_kernel_loss_path_equals_the_vocab_parallel_loss(interpret, monkeypatch):
    """The path CUDA takes without TP (loom.kernels.fused_linear_cross_entropy; its torch twin on CPU) gives the
    same loss and gradients as the executor's own vocab-parallel cross-entropy. With the interpreter, every
    kernel of the layer (flash attention, RMSNorm, RoPE, SwiGLU) runs its Triton source, forward and backward."""
    _triton_interpreter(monkeypatch, interpret)
    m = ModelSpec(layers=1, hidden=32, heads=4, ffn_hidden=48, vocab=257, seq_len=8)
    ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
    tgt = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(1))
    out = []
    for fused in (False, True):
        model = Decoder(BuildCtx(m, seed=5))
        model.fused_ce = fused
        loss = model.loss_sum(model(ids), tgt)
        loss.backward()
        out.append((loss.detach(), {k: p.grad for k, p in model.named_parameters()}))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-6, atol=0)
    for k in out[0][1]:
        torch.testing.assert_close(out[0][1][k], out[1][1][k], rtol=1e-5, atol=1e-6)


def test_loss_scaling_skips_overflowing_steps_and_otherwise_matches_unscaled():
    """The fp16 machinery (exercised in fp32 on CPU): a scaled loss, unscaled gradients and the same update as
    without scaling; an overflow skips the step, leaves the parameters alone and halves the scale."""
    from loom.executor.mesh import build_mesh
    from loom.executor.trainer import Trainer
    spec = spec_from_dict(_spec(training={"global_batch": 2, "precision": "fp32", "lr": 1e-2}))
    runs = []
    for scale in (None, 2.0 ** 10):
        tr = Trainer(spec, build_mesh(spec.plan, "cpu"), torch.device("cpu"), steps=3)
        tr.scaler = LossScaler(scale=scale) if scale else None
        runs.append([tr.step().loss for _ in range(3)])
    assert runs[1] == pytest.approx(runs[0], rel=1e-6)
    tr = Trainer(spec, build_mesh(spec.plan, "cpu"), torch.device("cpu"), steps=3)
    tr.scaler = LossScaler(scale=1e39)                     # loss · scale overflows fp32
    before = {k: p.detach().clone() for k, p in tr.model.named_parameters()}
    s = tr.step()
    assert s.skipped and tr.scaler.scale == 5e38
    assert all(torch.equal(before[k], p) for k, p in tr.model.named_parameters())
