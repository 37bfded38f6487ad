"""The per-GPU memory model against independent derivations: Korthikanti et al. 2022 Table 2, Megatron-LM's
theoretical memory formula, the ZeRO paper's bytes per parameter, and the pipeline schedules' in-flight counts."""
from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loom.simulator.activations import ActivationAssumptions, chunk_microbatches_in_flight, layer_bytes
from loom.simulator.memory import GiB, MemoryReport, memory_report
from loom.spec import ModelSpec, load_spec, spec_from_dict
from loom.spec.schedules import build_schedule

ROOT = Path(__file__).resolve().parents[1]
KORTHIKANTI = ActivationAssumptions(flash_attention=False, dropout=True)


def gpt(h=1024, a=16, layers=24, s=2048, v=51200, **kw) -> ModelSpec:
    """A GPT-style model with Korthikanti's assumptions: MHA, GELU, ffn = 4h."""
    return ModelSpec(layers=layers, hidden=h, heads=a, ffn_hidden=4 * h, vocab=v, seq_len=s, activation="gelu",
                     norm="layernorm", position="learned", bias=True, **kw)


def spec(model: dict, world: int, parallel: dict, training: dict | None = None, gpu="H100-SXM") -> object:
    gpn = 8 if world % 8 == 0 else world
    return spec_from_dict({"model": model, "cluster": {"gpu": gpu, "gpus_per_node": gpn, "nodes": world // gpn},
                           "training": {"global_batch": 64, "micro_batch": 1, **(training or {})},
                           "parallel": parallel})


# ---- Korthikanti et al. 2022, Table 2 (bytes per layer; s, b, h, a, t) -----------------------------------
@pytest.mark.parametrize("t", [1, 2, 4, 8])
@pytest.mark.parametrize("b", [1, 4])
def test_layer_activations_reproduce_korthikanti_table2(t, b):
    m = gpt(h=2048, a=16, s=2048)
    s, h, a = m.seq_len, m.hidden, m.heads
    sbh = s * b * h
    tokens = s * b
    # no parallelism: 34·sbh + 5·a·s²·b
    assert layer_bytes(m, tokens, 2, 1, False, "none", KORTHIKANTI) == pytest.approx(sbh * 34 + 5 * a * s * s * b)
    # tensor parallel: sbh·(10 + 24/t + 5·a·s/(h·t))
    assert layer_bytes(m, tokens, 2, t, False, "none", KORTHIKANTI) == \
        pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    if t > 1:
        # tensor + sequence parallel: sbh·(34/t + 5·a·s/(h·t))
        assert layer_bytes(m, tokens, 2, t, True, "none", KORTHIKANTI) == \
            pytest.approx(sbh * (34 / t + 5 * a * s / (h * t)))
        # tensor + sequence parallel + selective recompute: 34·sbh/t
        assert layer_bytes(m, tokens, 2, t, True, "selective", KORTHIKANTI) == pytest.approx(sbh * 34 / t)
    # tensor parallel + selective recompute: sbh·(10 + 24/t)
    assert layer_bytes(m, tokens, 2, t, False, "selective", KORTHIKANTI) == pytest.approx(sbh * (10 + 24 / t))
    # full recompute: 2·sbh (the layer input)
    assert layer_bytes(m, tokens, 2, t, False, "full", KORTHIKANTI) == pytest.approx(2 * sbh)


def test_flash_attention_and_gqa_terms():
    """Loom's default (FlashAttention, no dropout) for a Llama layer, summed by hand: replicated 4 tensors of h;
    sharded Q, K, V, O (q + kv + kv + q) and four SwiGLU tensors of f; fp32 LSE per head."""
    m = ModelSpec(layers=2, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=1000, seq_len=8192)
    tokens = 8192
    per_token = 2 * (4 * 4096) + 2 * (4096 + 1024 + 1024 + 4096) + 4 * 2 * 14336 + 4 * 32
    assert layer_bytes(m, tokens, 2, 1, False, "none") == tokens * per_token
    # selective drops only the LSE under FlashAttention
    assert layer_bytes(m, tokens, 2, 1, False, "none") - layer_bytes(m, tokens, 2, 1, False, "selective") == \
        tokens * 4 * 32


# ---- Megatron-LM's theoretical_memory_usage.py, SP + selective, re-derived --------------------------------
def megatron_theoretical(h, a, L, f, v, s, b, tp, pp, dp, vpp, m, untied):
    """megatron/training/theoretical_memory_usage.py (compute_weight_and_optimizer_memory and
    compute_activation_memory), written out again for a GPT model without biases, MHA, LayerNorm."""
    layer = 2 * h * h * 2 + 2 * h * (f + 2)                    # attention 4h² + MLP 2hf + two LayerNorms (2h each)
    block = layer * L + 2 * h                                  # + final LayerNorm
    embedding = h * v
    most_loaded = (block / pp + embedding) / tp
    if untied and pp == 1:
        most_loaded += embedding / tp
    weights_and_optimizer = most_loaded * (6 + 12 / dp)       # distributed optimizer
    act = s * b * h * (18 + 4 * f / h) * L
    emb = 8 * s * b * pp + s * b * h * pp                      # token ids, embedding dropout mask
    if vpp > 1:
        factor = 1 + (pp - 1) / (pp * vpp)
    elif pp > 1:
        factor = min(1, m / pp)
    else:
        factor = 1
    act, emb = act * factor, emb * factor
    if pp == 1:
        act += s * b * h * 4 * (1 + v / h)
    return weights_and_optimizer, act / tp, emb / tp


@pytest.mark.parametrize("tp, pp, dp, vpp, m", [(8, 8, 4, 1, 16), (4, 4, 2, 1, 2), (8, 4, 2, 2, 8), (2, 2, 2, 3, 4)])
def test_first_stage_matches_megatron_theoretical_memory(tp, pp, dp, vpp, m):
    h, a, L, s, b, v = 4096, 32, 48, 2048, 2, 51200
    model = {"layers": L, "hidden": h, "heads": a, "ffn_hidden": 4 * h, "vocab": v, "seq_len": s,
             "activation": "gelu", "norm": "layernorm", "position": "rope", "bias": False}
    sp = spec(model, tp * pp * dp, {"dp": dp, "tp": tp, "pp": pp, "sp": True, "zero": 1,
                                     "schedule": "interleaved" if vpp > 1 else "1f1b", "vpp": vpp},
              {"global_batch": m * dp * b, "micro_batch": b, "recompute": "selective"})
    stage0 = memory_report(sp, KORTHIKANTI).per_stage[0]
    weights, act, emb = megatron_theoretical(h, a, L, 4 * h, v, s, b, tp, pp, dp, vpp, m, untied=True)
    # Two deliberate differences, accounted exactly: Megatron's formula divides the LayerNorms by tp (they are
    # replicated over TP ranks, as Loom counts them) and spreads the final LayerNorm over all stages (Loom: the
    # last stage holds it).
    per_param = 6 + 12 / dp
    norms_on_stage = (L // pp) * 2 * (2 * h)
    adjusted = weights + per_param * (norms_on_stage * (1 - 1 / tp) - 2 * h / (pp * tp))
    assert stage0.model_states == pytest.approx(adjusted, rel=1e-9)
    # the layers' activations match exactly
    assert stage0.activations == pytest.approx(act, rel=1e-12)
    # embedding buffers: Megatron charges the token ids and dropout mask of pp·factor micro-batches (its layers'
    # factor) and divides the int64 ids by tp; Loom keeps the ids whole and counts the micro-batches whose
    # chunk-0 forward is alive, walked from the stage's program (more than Megatron's under interleaving)
    alive = peak = 0
    for op in build_schedule(sp.plan.schedule, pp, m, vpp)[0]:
        if op.kind in ("F", "B") and op.chunk == 0:
            alive += 1 if op.kind == "F" else -1
            peak = max(peak, alive)
    assert stage0.embedding_buffers == peak * (8 * s * b + s * b * h / tp)
    megatron_mbs = pp * (1 + (pp - 1) / (pp * vpp) if vpp > 1 else min(1, m / pp))
    assert emb == pytest.approx(megatron_mbs * (8 * s * b + s * b * h) / tp)
    assert peak >= megatron_mbs


# ---- ZeRO bytes per parameter ----------------------------------------------------------------------------
LLAMA8 = {"preset": "llama3-8b"}


@pytest.mark.parametrize("zero, expect", [(0, (2, 4, 12)), (1, (2, 4, 12 / 8)), (2, (2, 4 / 8, 12 / 8)),
                                          (3, (2 / 8, 4 / 8, 12 / 8))])
def test_zero_stages_shard_states_per_the_zero_paper(zero, expect):
    """Rajbhandari et al. 2020 §5, mixed-precision Adam with fp32 gradients: 2 + 4 + 12 = 18 bytes/param
    (Megatron's figure), divided by N_d for the sharded parts."""
    n = ModelSpec(**{**__import__("loom.spec", fromlist=["PRESETS"]).PRESETS["llama3-8b"]}).param_count()
    st = memory_report(spec(LLAMA8, 8, {"dp": 8, "zero": zero})).per_stage[0]
    for got, per_param in zip((st.params, st.grads, st.optimizer), expect):
        assert got == pytest.approx(n * per_param, rel=1e-6)


def test_fp32_has_no_master_copy_and_sgd_one_moment():
    n = 8_030_261_248
    st = memory_report(spec(LLAMA8, 8, {"dp": 8}, {"precision": "fp32"})).per_stage[0]
    assert (st.params, st.grads, st.optimizer) == (4 * n, 4 * n, 8 * n)
    # momentum SGD (torch.optim.SGD's momentum_buffer): fp32 master 4 + momentum 4
    st = memory_report(spec(LLAMA8, 8, {"dp": 8}, {"optimizer": "sgd", "grad_dtype": "bf16"})).per_stage[0]
    assert (st.params, st.grads, st.optimizer) == (2 * n, 2 * n, 8 * n)


def test_zero_shards_over_dp_times_cp():
    a = memory_report(spec(LLAMA8, 8, {"dp": 8, "zero": 3})).per_stage[0]
    b = memory_report(spec(LLAMA8, 8, {"dp": 2, "cp": 4, "zero": 3})).per_stage[0]
    assert a.model_states == b.model_states


# ---- pipeline stages and schedules ------------------------------------------------------------------------
def test_in_flight_counts_per_schedule():
    assert [chunk_microbatches_in_flight("1f1b", 4, i, 8) for i in range(4)] == [4, 3, 2, 1]
    assert [chunk_microbatches_in_flight("1f1b", 4, i, 2) for i in range(4)] == [2, 2, 2, 1]
    assert [chunk_microbatches_in_flight("afab", 4, i, 8) for i in range(4)] == [8] * 4
    # Megatron's interleaved warm-up: (pp − i − 1)·2 + (vpp − 1)·pp, plus the first steady-state forward
    assert [chunk_microbatches_in_flight("interleaved", 4, i, 8, vpp=2) for i in range(4)] == [11, 9, 7, 5]


@pytest.mark.parametrize("pp, vpp", [(4, 2), (8, 2), (8, 4), (16, 3)])
def test_interleaved_first_stage_holds_megatrons_penalty(pp, vpp):
    """Stage 0 holds layers·(1 + (pp−1)/(pp·vpp)) layers' worth of one micro-batch (Megatron's factor)."""
    L = pp * vpp * 2
    chunk_layers = L // (pp * vpp)
    held = chunk_microbatches_in_flight("interleaved", pp, 0, 10 * pp, vpp) * chunk_layers
    assert held == pytest.approx(L * (1 + (pp - 1) / (pp * vpp)))


def test_first_middle_and_last_stages_differ():
    r = memory_report(spec(LLAMA8, 32, {"dp": 8, "pp": 4}))
    first, mid, last = r.per_stage[0], r.per_stage[1], r.per_stage[3]
    emb = 128256 * 4096
    assert first.params - mid.params == 2 * emb                         # the embedding
    assert last.params - mid.params == 2 * (emb + 4096)                 # the head and the final norm
    assert first.embedding_buffers > 0 and mid.embedding_buffers == last.embedding_buffers == 0
    assert last.logits_buffers > 0 and first.logits_buffers == mid.logits_buffers == 0
    assert first.microbatches_in_flight == 4 and last.microbatches_in_flight == 1
    assert r.peak_bytes == max(s.peak for s in r.per_stage)


def test_tied_embedding_copy_on_last_stage_with_pp():
    gpt2 = {"preset": "gpt2-124m"}
    one = memory_report(spec(gpt2, 1, {"dp": 1})).per_stage[0]
    two = memory_report(spec(gpt2, 2, {"pp": 2})).per_stage
    table = 50257 * 768
    # pp = 1 shares the table; pp = 2 keeps a second copy on the last stage (Megatron)
    assert (two[0].params + two[1].params) // 2 == one.params // 2 + table


def test_vocab_is_padded_to_a_multiple_of_tp():
    """GPT-2 on tp = 4: the 50257-row table is padded to 50260, 12565 rows per rank; per layer the 12h² weights
    and column-parallel biases (3h for QKV, 4h for fc1) are split, the two LayerNorms (4h) and the row-parallel
    biases (2h: attention output, fc2) replicated; learned positions and the final LayerNorm replicated."""
    h, L = 768, 12
    r = memory_report(spec({"preset": "gpt2-124m"}, 4, {"tp": 4}))
    per_rank = L * ((12 * h * h + 7 * h) // 4 + 6 * h) + 12565 * h + 1024 * h + 2 * h
    assert r.per_stage[0].params == 2 * per_rank


def test_report_contract_and_json():
    r = memory_report(spec(LLAMA8, 8, {"dp": 8, "zero": 3}))
    d = r.to_dict()
    assert {"peak_bytes", "per_stage", "fits", "headroom_bytes", "hbm_bytes"} <= set(d)
    json.dumps(d)
    assert d["headroom_bytes"] == d["hbm_bytes"] - d["peak_bytes"]
    s0 = d["per_stage"][0]
    parts = ["params", "grads", "optimizer", "activations", "embedding_buffers", "logits_buffers", "workspace",
             "comm_buffers", "overhead"]
    assert abs(sum(s0[k] for k in parts) - s0["peak"]) <= len(parts)


def test_simulator_does_not_import_torch():
    code = "import sys, loom.simulator.memory, loom.simulator.activations; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- examples ---------------------------------------------------------------------------------------------
EXAMPLES = sorted(p for p in glob.glob(str(ROOT / "examples" / "*.toml")) if not p.endswith("tiny-cpu.toml"))


def test_the_required_examples_exist():
    names = {Path(p).name for p in EXAMPLES}
    assert {"gpt2-124m-1gpu.toml", "llama3.2-1b-h200.toml", "llama3-8b-8xh100.toml", "llama3-70b-64xh100.toml",
            "gpt3-175b-1024xa100.toml", "llama3-405b-16k-h100.toml", "llama-1.5b-h200.toml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: Path(p).name)
def test_every_example_validates_simulates_and_fits(path):
    s = load_spec(path)
    r = memory_report(s)
    assert isinstance(r, MemoryReport) and len(r.per_stage) == s.plan.pp
    assert r.fits, f"{Path(path).name}: {r.peak_bytes / GiB:.1f} GiB > {r.hbm_bytes / GiB:.1f} GiB"


def test_baseline_example_is_the_measured_model():
    """llama-1.5b-h200.toml is the model of shared/reference/h200_torch_baseline (1,498,482,688 params)."""
    s = load_spec(ROOT / "examples" / "llama-1.5b-h200.toml")
    assert s.model.param_count() == 1_498_482_688


def test_llama3_405b_example_stage_count_and_tokens():
    s = load_spec(ROOT / "examples" / "llama3-405b-16k-h100.toml")
    assert (s.plan.tp, s.plan.pp, s.plan.dp, s.plan.cp) == (8, 16, 128, 1)
    assert s.world_size == 16384 and s.tokens_per_step == 2048 * 8192   # 16M tokens per step
    # Llama 3 §3.3.2: 126 layers, the first and last stages one layer lighter than the other fourteen.
    r = memory_report(s)
    assert s.model.layers == 126 and [st.layers for st in r.per_stage] == [7] + [8] * 14 + [7]


def test_overhead_is_context_plus_fragmentation():
    from loom.simulator.memory import CUDA_CONTEXT_BYTES, FRAGMENTATION
    s = memory_report(spec(LLAMA8, 8, {"dp": 8, "zero": 3})).per_stage[0]
    allocated = s.peak - s.overhead
    assert s.overhead == pytest.approx(CUDA_CONTEXT_BYTES + FRAGMENTATION * allocated, abs=2)
    cpu = memory_report(spec({"preset": "gpt2-124m"}, 1, {"dp": 1}, {"precision": "fp32"}, gpu="cpu")).per_stage[0]
    assert cpu.overhead == pytest.approx(FRAGMENTATION * (cpu.peak - cpu.overhead), abs=2)
