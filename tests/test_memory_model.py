"""The per-GPU memory model against independent derivations: Korthikanti et al. 2022 Table 2, Megatron-LM's
theoretical memory formula, the ZeRO paper's bytes per parameter, and the pipeline schedules' in-flight counts."""
from __future__ import annotations

import glob
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from loom.simulator.activations import ActivationAssumptions, chunk_microbatches_in_flight, layer_bytes
from loom.simulator.memory import GiB, MemoryReport, _logits_bytes, memory_report
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


# ---- the loss and the LM head by implementation (simulator/memory.py _logits_bytes) --------------------------
TORCHTITAN_TP = ActivationAssumptions(loss="loss_parallel", sp_gathered_head_input=True)
TORCHTITAN_COMPILED = ActivationAssumptions(loss="compiled", sp_gathered_head_input=True)


def llama3(size: str) -> dict:
    dims = {"8B": (32, 4096, 32, 14336), "70B": (80, 8192, 64, 28672)}[size]
    return {"layers": dims[0], "hidden": dims[1], "heads": dims[2], "kv_heads": 8, "ffn_hidden": dims[3],
            "vocab": 128256, "seq_len": 8192}


def test_loss_parallel_and_gathered_head_input_on_the_70b_2d_run():
    """torchtitan's 70B 2D run (docs/performance.md Table 4): TP 8 + SP, FSDP 32, local batch 16 x 8192 in one
    micro-batch, full AC. By hand, T = 131,072 tokens, v/tp = 128,256 / 8 = 16,032, h = 8,192:
    saved  = 2·T·h/8 (final-norm input, SP shard) 268,435,456 + 2·T·h (the head's all-gathered input)
             2,147,483,648 + 4·T·16,032 (fp32 log-probs, L) 8,405,385,216 = 10,821,304,320 B;
    loss backward (loss_parallel): grad_input, exp(x) and their sum beside the saved x: 3L = 25,216,155,648 B,
    larger than the recomputed layer's transient, so it is the workspace. Against the default (unfused loss,
    sharded head input) the allocation grows by 2·T·h·7/8 + L = 10,284,433,408 B, and the peak by that x 1.05."""
    s = spec(llama3("70B"), 256, {"dp": 32, "tp": 8, "sp": True, "zero": 3},
             {"global_batch": 512, "micro_batch": 16, "recompute": "full"}, gpu="H100-SXM")
    st = memory_report(s, TORCHTITAN_TP).per_stage[0]
    default = memory_report(s).per_stage[0]
    assert st.logits_buffers == 10_821_304_320
    assert st.workspace == 25_216_155_648
    assert default.workspace == 2 * 8_405_385_216
    assert st.peak - default.peak == pytest.approx(10_284_433_408 * 1.05, abs=2)
    # without SP the head's input is the (unsharded) norm output either way: only the loss changes
    no_sp = s.with_parallel(sp=False)
    assert memory_report(no_sp, ActivationAssumptions(sp_gathered_head_input=True)).peak_bytes == \
        memory_report(no_sp).peak_bytes


def test_compiled_loss_on_the_h200_8b_run():
    """torchtitan's June 2025 H200 run (8B, FSDP 32, local batch 2 x 8192, per-op SAC, torch.compile, which at
    torchtitan e7c0cae compiles the loss): T = 16,384, v = 128,256, h = 4,096, tp = 1. By hand: saved = the
    final norm's input and output 2·2·T·h = 268,435,456 + the bf16 logits 2·T·v = 4,202,692,608 + two fp32 per
    row 8·T = 131,072 → 4,471,259,136 B; transient = the bf16 logits gradient + one fp32 per row,
    4,202,692,608 + 65,536 = 4,202,758,144 B (larger than the per-op recompute transient). The default's
    saved + transient (4·T·h + 4·T·v + 2·4·T·v) is 16,810,573,824 B more."""
    s = spec(llama3("8B"), 32, {"dp": 32, "zero": 3}, {"global_batch": 64, "micro_batch": 2, "recompute": "op"},
             gpu="H200")
    st = memory_report(s, TORCHTITAN_COMPILED).per_stage[0]
    default = memory_report(s).per_stage[0]
    assert st.logits_buffers == 4_471_259_136
    assert st.workspace == 4_202_758_144
    assert (default.logits_buffers + default.workspace) - (st.logits_buffers + st.workspace) == 16_810_573_824


def test_unknown_loss_implementation_is_refused():
    with pytest.raises(ValueError, match="loss"):
        ActivationAssumptions(loss="fused")


def _allocation_profile(fn, min_bytes: int) -> tuple[int, int]:
    """(peak, end) of the bytes the CPU allocator holds while `fn` runs, relative to its start, counting only
    blocks of at least `min_bytes` (the (T, v)-sized ones): the profiler's alloc/free events in time order."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and abs(e.nbytes()) >= min_bytes)
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak, live


def test_loss_transients_match_the_torch_sources_on_cpu():
    """The multiples of L (fp32 (T, v) logits) in _logits_bytes, measured on the installed torch's own code
    (CPU allocator events; torch 2.13, the functions unchanged since loss_parallel landed in 2024). aten
    cross-entropy: the forward keeps L (log-probs) and peaks at 2L beside the bf16 logits, the backward peaks at
    3L with the saved L (transient 2L). loss_parallel's `_log_softmax` keeps L and peaks at 2L beside its fp32
    input; its fused nll/log_softmax backward peaks at 4L with the saved L (transient 3L)."""
    torch = pytest.importorskip("torch")
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss as lp

    N, V = 1024, 4000
    L = 4 * N * V
    pred = torch.randn(N, V, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, V, (N,))
    box = {}

    def aten_forward():
        box["loss"] = F.cross_entropy(pred.float(), target)
    assert _allocation_profile(aten_forward, N * V) == (2 * L, L)
    peak, end = _allocation_profile(lambda: box.pop("loss").backward(), N * V)
    assert peak == 2 * L                                  # beside the saved log-probs (L, already held)
    m = ModelSpec(layers=1, hidden=64, heads=4, ffn_hidden=128, vocab=V, seq_len=N)
    assert _logits_bytes(m, N, 1, False, 2, ActivationAssumptions(loss="unfused"))[1] == peak

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        x = pred.detach().float()

        def lp_forward():
            box["logp"] = lp._log_softmax(x, 1, False, mesh, 0)
        assert _allocation_profile(lp_forward, N * V) == (2 * L, L)      # shifted, exp(shifted); then the result
        del x

        def lp_backward():
            box["grad"] = lp._nll_loss_and_log_softmax_backward(
                torch.ones(()), box["logp"], target, None, 1, -100, torch.tensor(float(N)), box["logp"].shape, 1,
                mesh, 0)
        peak, _ = _allocation_profile(lp_backward, N * V)
        assert peak == 3 * L                              # beside the saved log-probs
        assert _logits_bytes(m, N, 1, False, 2, ActivationAssumptions(loss="loss_parallel"))[1] == peak
    finally:
        if created:
            dist.destroy_process_group()


def test_compiled_loss_saves_the_bf16_logits_and_row_statistics():
    """What torch.compile's partitioner keeps for the backward of torchtitan's loss (AOTAutograd min-cut over
    inductor's decompositions, no code generation): the bf16 logits and (N, 1) fp32 rows only, no (N, V) fp32."""
    torch = pytest.importorskip("torch")
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    N, V = 128, 1000
    saved = []

    def forward_compiler(gm, _):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        saved.extend(a.meta["val"] for a in out.args[0][1:])          # [0] is the loss
        return gm

    def ce(pred, labels):
        return torch.nn.functional.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1))

    f = aot_function(ce, fw_compiler=forward_compiler, bw_compiler=lambda gm, _: gm,
                     partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    f(torch.randn(2, N // 2, V, dtype=torch.bfloat16, requires_grad=True), torch.randint(0, V, (2, N // 2)))
    big = [t for t in saved if t.numel() >= N * V]
    assert [(t.dtype, t.numel()) for t in big] == [(torch.bfloat16, N * V)]
    rows = sum(t.numel() * t.element_size() for t in saved if t.dtype == torch.float32 and t.numel() > 1)
    assert rows == 2 * 4 * N                                                        # max and log-sum-exp
    m = ModelSpec(layers=1, hidden=64, heads=4, ffn_hidden=128, vocab=V, seq_len=N)
    saved_model, _ = _logits_bytes(m, N, 1, False, 2, ActivationAssumptions(loss="compiled"))
    assert saved_model - 2 * 2 * N * 64 == 2 * N * V + rows                         # beyond the norm's two


def test_fused_chunked_loss_by_hand_on_the_1_5b_example():
    """examples/llama-1.5b-h200.toml (one H200, bf16, micro-batch 2 x 4096 = 8192 tokens, vocab 128256, hidden
    2048, no recompute): loom.kernels' fused linear cross-entropy (what the executor runs on one GPU without TP)
    keeps the final norm's input, grad_h (2 B x T x h) and grad_W (2 B x v x h) and needs one chunk of bf16 logits
    (256 MiB / (v x 2 B) = 1046 tokens, rounded down to 64: 1024); the default unfused loss keeps the norm's input
    and output and the fp32 log-probs (4 B x T x v) and needs their two fp32 gradients."""
    from dataclasses import replace

    import torch

    from loom.kernels.fused_linear_ce import default_chunk_size
    from loom.simulator.activations import fused_ce_chunk_tokens
    from loom.simulator.memory import memory_report
    from loom.spec import load_spec
    from loom.verify_predict import EXECUTOR_ACTIVATIONS
    T, v, h = 8192, 128256, 2048
    assert fused_ce_chunk_tokens(T, v, 2) == default_chunk_size(T, v, torch.bfloat16) == 1024
    assert fused_ce_chunk_tokens(100, 50304, 4) == default_chunk_size(100, 50304, torch.float32) == 100
    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / "llama-1.5b-h200.toml")
    unfused = memory_report(spec, EXECUTOR_ACTIVATIONS).per_stage[0]
    fused = memory_report(spec, replace(EXECUTOR_ACTIVATIONS, loss="fused_chunked")).per_stage[0]
    assert unfused.logits_buffers == 2 * 2 * T * h + 4 * T * v == 4_269_801_472
    assert unfused.workspace == 2 * 4 * T * v == 8_405_385_216
    assert fused.logits_buffers == 2 * T * h + 2 * T * h + 2 * v * h == 592_445_440
    assert fused.workspace == 2 * 1024 * v == 262_668_288
    assert (fused.params, fused.activations) == (unfused.params, unfused.activations)   # only the loss moves
