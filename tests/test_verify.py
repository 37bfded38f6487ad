"""loom verify: plans in fp32 and bf16 run on two gloo ranks (one pool for the module) and every exact metric - comm bytes per
kind, parameter / gradient / optimizer bytes per stage - equals its prediction; timing is reported (finite and
positive); one end-to-end `loom verify --json` through torchrun. The checks that need no processes are in
test_verify_layout.py."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loom.spec.load import spec_from_dict
from verify_specs import BASE, CACHE, make_spec

ROOT = Path(__file__).resolve().parents[1]
PLANS = {
    "dp2-zero1": {"dp": 2, "zero": 1, "bucket_MB": 0.05},
    "tp2-sp": {"tp": 2, "sp": True},
    "pp2-1f1b": {"pp": 2, "schedule": "1f1b"},
    "cp2": {"cp": 2},
    "dp2-zero3": {"dp": 2, "zero": 3},
    "dp2-zero2": {"dp": 2, "zero": 2, "bucket_MB": 0.05},      # 2 micro-batches: reduced after each
    # beyond the five of the brief: full recompute (torch's checkpoint early stop), tied embeddings across stages
    "tp2-sp-full-recompute": {"tp": 2, "sp": True, "_training": {"recompute": "full"}},
    "pp2-interleaved-tied": {"pp": 2, "schedule": "interleaved", "vpp": 2, "_model": {"tied_embeddings": True}},
    # bf16 (CPU autocast, the CUDA path): 2-byte parameters and residual stream, fp32 masters with the optimizer
    # states (executor/dp.py), the memory model's layout: the same rows exact
    "dp2-zero1-bf16": {"dp": 2, "zero": 1, "bucket_MB": 0.05, "_training": {"precision": "bf16"}},
    "dp2-zero3-bf16": {"dp": 2, "zero": 3, "_training": {"precision": "bf16"}},
    "tp2-sp-bf16": {"tp": 2, "sp": True, "_training": {"precision": "bf16"}},
    "pp2-1f1b-bf16": {"pp": 2, "schedule": "1f1b", "_training": {"precision": "bf16"}},
    "cp2-bf16": {"cp": 2, "_training": {"precision": "bf16"}},
}
STEPS = 3


def _measure_job(parallel: dict, steps: int) -> dict:
    import torch
    from loom.executor.measure import measure
    return measure(make_spec(parallel), steps, torch.device("cpu"))


@pytest.fixture(scope="module")
def measured():
    from tests.test_executor_pp_harness import RankPool
    pool = RankPool(2)
    try:
        yield {name: {"ranks": pool.run(_measure_job, par, STEPS)} for name, par in PLANS.items()}
    finally:
        pool.close()


@pytest.mark.parametrize("name", list(PLANS))
def test_exact_metrics_equal_their_predictions(measured, name):
    from loom.verify import compare
    spec = make_spec(PLANS[name])
    rows = compare(spec, measured[name])
    exact = [r for r in rows if r.metric.startswith(("comm bytes", "params bytes", "grads bytes", "optimizer bytes",
                                                     "param elements"))]
    assert exact, "no exact rows"
    bad = [(r.metric, r.predicted, r.measured, r.note) for r in exact if r.ok is not True]
    assert not bad, bad
    # the layers' saved bytes per micro-batch: the memory model with the executor's kernels, to the byte (the
    # CPU twins save what the GPU kernels save; SP keeps the shard; ring attention's out is o-proj's input).
    # Under recompute too (measure.py counts checkpoint inputs and the selective-checkpoint cache; more layouts in
    # tests/test_verify_recompute.py). In flight: the memory model's buffers plus the executor's extras.
    act = [r for r in rows if r.metric.startswith(("activation bytes per micro-batch", "activation bytes in flight",
                                                   "recompute transient bytes"))]
    assert len(act) == spec.plan.pp * (3 if spec.training.recompute != "none" else 2)
    # (interleaved stage 0 too: the token ids of its 4 chunk-0 forwards in flight, first_chunk_microbatches_in_flight)
    assert all(r.measured == r.predicted and r.ok for r in act), [(r.metric, r.predicted, r.measured) for r in act]
    # fp32 on CPU: the plan's own bytes (spec/compile.py) equal the measurement for every kind it lists
    plan_off = [(r.metric, r.reference, r.measured, r.note) for r in rows
                if r.metric.startswith("comm bytes") and r.reference is not None and round(r.reference) != r.measured]
    assert not plan_off, plan_off
    assert not [r.metric for r in rows if "other:" in r.metric], "a collective the verifier cannot classify"
    # every plan collective kind with bytes in the plan has a measured row
    from loom.spec.compile import compile_plan
    from loom.verify_predict import plan_comm_bytes
    plan = compile_plan(spec)
    for stage in range(spec.plan.pp):
        for kind in plan_comm_bytes(plan, stage):
            assert any(r.metric == f"comm bytes {kind} (stage {stage})" for r in rows), kind
    # timing: reported, finite and positive (CPU timings on a shared machine are not held to a tolerance here)
    for metric in ("step time", "tokens/s"):
        row = next(r for r in rows if r.metric == metric)
        assert row.measured > 0 and math.isfinite(row.measured) and row.predicted > 0
    bubble = next(r for r in rows if r.metric == "bubble fraction")
    assert 0.0 <= bubble.measured < 1.0
    for r in rows:
        if r.metric.startswith("exposed comm"):
            assert r.measured >= 0 and math.isfinite(r.measured)


def test_pipeline_bubble_is_measured_larger_than_without_pipeline(measured):
    """With pp = 2 and 4 micro-batches the stages wait for each other ((p-1)/(m+p-1) = 20 % with uniform
    stages); without PP only scheduling noise leaves gaps. Checks that the measured bubble sees the schedule
    (loose bounds: CPU timings on a shared machine)."""
    from loom.verify import compare
    pp = next(r for r in compare(make_spec(PLANS["pp2-1f1b"]), measured["pp2-1f1b"]) if r.metric == "bubble fraction")
    dp = next(r for r in compare(make_spec(PLANS["dp2-zero1"]), measured["dp2-zero1"]) if r.metric == "bubble fraction")
    assert pp.measured > 0.1 and pp.measured > dp.measured, (pp.measured, dp.measured)


def test_a_wrong_byte_count_fails(measured):
    """The comparison can fail: one extra byte in one collective record breaks equality."""
    from loom.verify import compare
    data = json.loads(json.dumps(measured["dp2-zero1"]))
    rec = next(r for r in data["ranks"][0]["steps"][-1]["comm"] if "dp_reducescatter" in r["tag"])
    rec["bytes"] += 1
    rows = compare(make_spec(PLANS["dp2-zero1"]), data)
    row = next(r for r in rows if r.metric == "comm bytes dp_reducescatter (stage 0)")
    assert row.ok is False and row.measured == row.predicted + 1


def test_activations_are_measured_per_layer_and_shard_with_tp(measured):
    """Saved activation bytes per micro-batch: TP+SP roughly halves what a dp rank saves (every saved tensor of a
    layer is sharded over tp with SP), and they are positive."""
    from loom.verify import compare
    get = lambda n: next(r for r in compare(make_spec(PLANS[n]), measured[n])   # noqa: E731
                         if r.metric.startswith("activation bytes per micro-batch"))
    full, tp = get("dp2-zero1").measured, get("tp2-sp").measured
    assert full > 0 and 0.3 * full < tp < 0.7 * full


# ---- end to end: the CLI through torchrun ---------------------------------------------------------------------------
def test_loom_verify_cli_json(tmp_path):
    toml = tmp_path / "dp2.toml"
    toml.write_text(f"""
[model]
name = "t"
layers = 2
hidden = 64
heads = 4
kv_heads = 2
ffn_hidden = 128
vocab = 257
seq_len = 32
[cluster]
gpu = "cpu"
gpus_per_node = 2
[training]
global_batch = 8
micro_batch = 2
precision = "fp32"
recompute = "none"
[parallel]
dp = 2
zero = 2
[data]
cache_dir = "{CACHE}"
[verify]
step_time_cpu = 100.0
activations = 100.0
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "loom.cli", "verify", str(toml), "--steps", "2", "--json"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert p.returncode in (0, 1), p.stderr
    out = json.loads(p.stdout)
    names = {m["metric"]: m for m in out["metrics"]}
    for m in out["metrics"]:
        assert set(m) >= {"predicted", "measured", "ratio", "ok"}
    assert names["params bytes (stage 0)"]["ok"] is True
    assert names["comm bytes dp_reducescatter (stage 0)"]["ok"] is True
    # the exit status says whether anything is outside its tolerance, and the generous [verify] table applied
    assert (p.returncode == 1) == bool(out["failed"])
    assert names["step time"]["tolerance"] == 100.0


def test_measured_trace_has_the_simulators_layout(measured, tmp_path):
    """The measured step's trace uses the simulator's processes (one per stage) and threads (compute/comm/p2p),
    with the same op names, so the two open side by side in Perfetto."""
    from loom.simulator import simulate_time
    from loom.simulator.trace import chrome_trace
    from loom.verify import write_trace
    spec = make_spec(PLANS["pp2-1f1b"])
    path = tmp_path / "measured.json"
    write_trace(spec, measured["pp2-1f1b"], str(path))
    got = json.loads(path.read_text())["traceEvents"]
    sim = chrome_trace(simulate_time(spec))["traceEvents"]
    meta = lambda ev: sorted((e["pid"], e.get("tid", -1), e["args"]["name"]) for e in ev if e["ph"] == "M")  # noqa: E731
    assert meta(got) == meta(sim)
    names = lambda ev: {(e["pid"], e["name"]) for e in ev if e["ph"] == "X" and e.get("cat") != "collective"}  # noqa: E731
    assert names(got) <= names(sim) and any(e.get("cat") == "collective" for e in got)
    assert all(e["dur"] >= 0 for e in got if e["ph"] == "X")


def test_saved_activations_per_layer_agree_across_stages_and_schedule_in_flight(measured):
    """pp2 1F1B: each stage holds one layer, so the bytes a layer saves per micro-batch agree between the stages
    (within 2 %: stage 1's layer input is a received leaf); and the peak of live saved bytes holds the memory
    model's in-flight count of micro-batches (1F1B: min(pp - stage, m) = 2 on stage 0, 1 on stage 1)."""
    from loom.verify import compare
    rows = {r.metric: r for r in compare(make_spec(PLANS["pp2-1f1b"]), measured["pp2-1f1b"])}
    a = rows["activation bytes per micro-batch, 1 layers (stage 0)"].measured
    b = rows["activation bytes per micro-batch, 1 layers (stage 1)"].measured
    assert a > 0 and abs(a - b) / b < 0.02
    for stage, n in ((0, 2), (1, 1)):
        r = rows[f"micro-batches in flight (stage {stage})"]     # reported only: a ratio of averages
        assert r.predicted == n and r.ok is None and abs(r.measured - n) / n < 0.03, (r.predicted, r.measured)


def test_saved_activation_bytes_match_an_independent_single_process_count(measured):
    """The per-layer bytes measured on pp2's last stage equal a plain count in this process: one layer of the
    same model, one micro-batch, every distinct storage saved inside the Block that is not a parameter or buffer."""
    import torch
    from loom.executor.model import BuildCtx, Decoder
    from loom.verify import compare
    spec = make_spec(PLANS["pp2-1f1b"])
    dec = Decoder(BuildCtx(spec.model), layers=range(1), first=True, last=True)
    params = {p.untyped_storage().data_ptr() for p in list(dec.parameters()) + list(dec.buffers())}
    inside, seen, total = [False], set(), [0]
    dec.layers[0].register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    dec.layers[0].register_forward_hook(lambda *a: inside.__setitem__(0, False))

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if inside[0] and ptr not in params and ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t
    ids = torch.randint(spec.model.vocab, (spec.training.micro_batch, spec.model.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dec(ids)
    rows = {r.metric: r for r in compare(spec, measured["pp2-1f1b"])}
    assert rows["activation bytes per micro-batch, 1 layers (stage 1)"].measured == total[0]


@pytest.mark.parametrize("model", [{}, {"bias": True, "norm": "layernorm", "activation": "gelu",
                                         "position": "learned", "kv_heads": 4}])
def test_one_layer_saves_what_the_memory_model_counts_for_the_executors_kernels(model):
    """One process, one layer: every distinct storage saved inside the Block (parameters and buffers left out)
    adds up to simulator/activations.py's layer_bytes with verify_predict.EXECUTOR_ACTIVATIONS, to the byte, for a
    Llama-style (RMSNorm, SwiGLU, RoPE, GQA) and a GPT-2-style (LayerNorm, GELU, biases, learned positions)
    layer; with the default assumptions (eager SwiGLU, no norm statistics) it would not be equal."""
    import torch
    from loom.executor.model import BuildCtx, Decoder
    from loom.simulator.activations import layer_bytes
    from loom.verify_predict import EXECUTOR_ACTIVATIONS
    spec = make_spec({"dp": 2}, **model)                # one rank's micro-batch: the layout does not matter
    m = spec.model
    dec = Decoder(BuildCtx(m), layers=range(1), first=True, last=True)
    state = {p.untyped_storage().data_ptr() for p in list(dec.parameters()) + list(dec.buffers())}
    inside, seen, total = [False], set(), [0]
    dec.layers[0].register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    dec.layers[0].register_forward_hook(lambda *a: inside.__setitem__(0, False))

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if inside[0] and ptr not in state and ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t
    b = spec.training.micro_batch
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dec(torch.randint(m.vocab, (b, m.seq_len)))
    tokens = b * m.seq_len
    assert total[0] == layer_bytes(m, tokens, 4, 1, False, "none", EXECUTOR_ACTIVATIONS)
    assert total[0] != layer_bytes(m, tokens, 4, 1, False, "none")


def test_measured_bubble_waits_for_the_pipeline_receive():
    """A forward that first waits 4 ms for its activation is busy only from the receive's end: on a synthetic
    two-op timeline of stage 1 the measured bubble is the wait."""
    from loom.simulator.timing import bubble_fraction
    from loom.spec.plan import OpKind
    from loom.spec.compile import compile_plan
    from loom.verify import measured_slices
    plan = compile_plan(make_spec(PLANS["pp2-1f1b"]))
    prog = plan.program(1)
    f = next(op for op in prog if op.kind == OpKind.FORWARD)
    b = next(op for op in prog if op.kind == OpKind.BACKWARD and op.microbatch == f.microbatch)
    step = {"ops": [[f.id, 0.0, 0.010], [b.id, 0.010, 0.020]],
            "comm": [{"kind": "recv", "group": "pp", "bytes": 1, "tag": f"pp.RECV_ACT{f.microbatch}.0",
                      "start": 0.0, "end": 0.004}]}
    slices, busy = measured_slices(plan, step)
    assert busy[f.id] == pytest.approx(0.006) and busy[b.id] == pytest.approx(0.010)
    durations = [busy.get(i, 0.0) for i in range(len(plan))]
    assert bubble_fraction({"stage1": slices}, durations) == pytest.approx(0.004 / 0.020)


def test_cuda_rows_on_a_cuda_measurement(measured):
    """The CUDA branches of the comparison (no GPU here: a CPU measurement relabelled): peak-memory rows appear with
    the GPU tolerance, step time uses the GPU tolerance, activations keep the executor's kernels' prediction."""
    from loom.verify import compare
    data = json.loads(json.dumps(measured["dp2-zero1"]))
    for r in data["ranks"]:
        r["device"] = "cuda:0"
        r["memory"].update(max_memory_allocated=10**6, max_memory_reserved=2 * 10**6)
    rows = {r.metric: r for r in compare(make_spec(PLANS["dp2-zero1"]), data)}
    assert rows["peak memory allocated (stage 0)"].tolerance == 0.05
    assert rows["peak memory reserved (stage 0)"].measured == 2 * 10**6
    assert rows["step time"].tolerance == 0.10
    act = rows["activation bytes per micro-batch, 2 layers (stage 0)"]
    assert act.measured == act.predicted < act.reference           # the default model: eager SwiGLU's 4 tensors
    # one GPU rank without TP: the executor's loss is the fused kernel, and the prediction says so
    from dataclasses import replace

    from loom.simulator.memory import memory_report
    from loom.verify_predict import EXECUTOR_ACTIVATIONS, executor_assumptions
    spec = make_spec(PLANS["dp2-zero1"])
    st = memory_report(spec, replace(EXECUTOR_ACTIVATIONS, loss="fused_chunked")).per_stage[0]
    assert rows["peak memory allocated (stage 0)"].predicted == st.peak - st.overhead
    assert "fused_chunked" in rows["peak memory allocated (stage 0)"].note
    assert executor_assumptions(make_spec(PLANS["tp2-sp"]), "cuda:0").loss == "unfused"    # TP: vocab-parallel
    assert executor_assumptions(spec, "cpu").loss == "unfused"


@pytest.mark.parametrize("par", [{"tp": 2, "sp": True}, {"tp": 2}, {"dp": 2, "zero": 1}, {"dp": 2, "zero": 3},
                                 {"pp": 2, "schedule": "1f1b"}])
def test_bf16_collectives_are_predicted_in_the_precisions_bytes(par):
    """Under bf16 the executor autocasts on CUDA and CPU alike and casts what enters or leaves a TP region, the
    pipeline messages and the ZeRO parameter gathers to bf16 (executor/model.py amp_cast, dp.py gather_dtype): the
    prediction equals the plan's bytes for every plan kind on both devices (tests/test_plan_executor_agreement.py
    measures the same on gloo), and is half the fp32 prediction except the fp32 cross-entropy all-reduces."""
    from loom.spec.compile import compile_plan
    from loom.verify_predict import comm_bytes, plan_comm_bytes
    d = json.loads(json.dumps(BASE))
    d["cluster"]["gpus_per_node"] = 2
    d["training"]["precision"] = "bf16"
    d["parallel"] = dict(par)
    spec = spec_from_dict(d)
    plan = compile_plan(spec)
    d["training"]["precision"] = "fp32"
    fp32 = comm_bytes(spec_from_dict(d), 0, "cpu")
    for dev in ("cpu", "cuda:0"):
        got = comm_bytes(spec, 0, dev)
        for kind, want in plan_comm_bytes(plan, 0).items():
            assert got[kind] == round(want), (dev, kind, got[kind], want)
    M, T = spec.micro_batches, spec.training.micro_batch * spec.model.seq_len
    ce = 3 * M * T * 4 if spec.plan.tp > 1 else 0
    for kind in ("sp_allgather", "sp_reducescatter", "pp_send_act", "zero_allgather"):
        assert 2 * got[kind] == fp32[kind]
    assert 2 * (got["tp_allreduce"] - ce) == fp32["tp_allreduce"] - ce


def test_executor_failure_shows_the_ranks_message_not_torchruns_traceback():
    from loom.verify import _failure
    err = ("[rank1]: Traceback (most recent call last):\n[rank1]:   File \"x.py\", line 1\n"
           "[rank1]: ValueError: ZeRO-3 is not supported with pipeline parallelism; fix: parallel.zero <= 2\n"
           "RuntimeError: [gloo] Connection closed by peer. This is typically caused by a remote worker crashing.\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    msg = _failure(1, err)
    assert msg.startswith("the executor failed (exit 1): ValueError: ZeRO-3 is not supported")
    assert "Traceback" not in msg
