"""Laws the step-time simulator must obey, checked on the real compile + simulate path.

Bubble fraction (definition in simulator/timing.py): with uniform stages and free communication, a stage is busy
m·(t_f + t_b) out of a pipeline phase of length T_pipe. Narayanan et al. 2021 §2.2.1: 1F1B (and GPipe/AFAB)
finish after (m + p − 1)·(t_f + t_b) because the last micro-batch's forward enters stage p−1 after p−1 forward
slots and its backward leaves stage 0 after p−1 backward slots; bubble = (p−1)/(m+p−1). §2.2.2: with v chunks per
stage each chunk op takes t/v, the ramp shrinks to (p−1)·(t_f+t_b)/v while the work stays m·(t_f+t_b):
bubble = ((p−1)/v) / (m + (p−1)/v) = (p−1)/(v·m + p − 1).
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from loom.spec import ClusterSpec, ModelSpec, ParallelSpec, Spec, TrainingSpec, compile_plan
from loom.spec.plan import OpKind
from loom.simulator import HardwareProfile, simulate_time

SMALL = dict(layers=24, hidden=256, heads=8, kv_heads=4, ffn_hidden=512, vocab=1000, seq_len=256)


def make(p=1, m=1, v=1, schedule="1f1b", gpn=None, nodes=1, recompute="none", **par) -> Spec:
    dp = par.get("dp", 1)
    world = p * dp * par.get("tp", 1) * par.get("cp", 1)
    gpn = gpn or max(1, world // nodes)
    return Spec(model=ModelSpec(**SMALL), cluster=ClusterSpec(gpus_per_node=gpn, nodes=nodes),
                training=TrainingSpec(global_batch=m * dp, recompute=recompute),
                parallel=ParallelSpec(pp=p, schedule=schedule, vpp=v, **par))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["afab", "1f1b", "interleaved"]), st.sampled_from([2, 3, 4]), st.integers(1, 6),
       st.sampled_from([2, 3]), st.floats(0.5, 2.0), st.floats(0.5, 4.0))
def test_uniform_bubble_fraction_matches_closed_form(kind, p, k, v, tf, tb):
    v = v if kind == "interleaved" else 1
    m = k * p if kind == "interleaved" else k
    spec = make(p, m, v, kind)
    plan = compile_plan(spec)
    # Uniform stages, free communication: every chunk forward takes tf/v, every chunk backward tb/v, the rest 0.
    d = [tf / v if o.kind == OpKind.FORWARD else tb / v if o.kind == OpKind.BACKWARD else 0.0 for o in plan.ops()]
    r = simulate_time(spec, plan, durations=d)
    assert r.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), rel=1e-9)
    assert r.step_time_s == pytest.approx((v * m + p - 1) * (tf + tb) / v, rel=1e-9)


def test_real_costs_bubble_close_to_law_when_head_is_tiny():
    # The real cost model: stages are nearly uniform (tiny vocab, big layers, so p2p latency and the activation
    # sends over NVLink are small next to compute).
    big = dict(layers=8, hidden=4096, heads=32, ffn_hidden=16384, vocab=8, seq_len=4096)
    spec = make(4, 8, schedule="1f1b").model_copy(update={"model": ModelSpec(**big)})
    r = simulate_time(spec)
    assert r.bubble_fraction == pytest.approx(3 / 11, abs=0.03)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["afab", "1f1b", "interleaved"]), st.sampled_from([2, 4]), st.integers(1, 4),
       st.integers(1, 4))
def test_more_micro_batches_never_raise_the_bubble(kind, p, k, extra):
    v = 2 if kind == "interleaved" else 1
    step = p if kind == "interleaved" else 1
    a = simulate_time(make(p, k * step, v, kind, dp=2, tp=2, gpn=4, nodes=p)).bubble_fraction
    b = simulate_time(make(p, (k + extra) * step, v, kind, dp=2, tp=2, gpn=4, nodes=p)).bubble_fraction
    assert b <= a + 1e-12


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([(1, 4, 2, 1), (2, 2, 2, 1), (4, 1, 1, 2), (2, 2, 1, 2)]), st.sampled_from([0, 1, 3]),
       st.sampled_from(["1f1b", "interleaved"]), st.floats(1.1, 8.0), st.booleans())
def test_more_bandwidth_never_slows_a_step(layout, zero, kind, factor, intra):
    p, dp, tp, cp = layout
    kind = kind if p > 1 else "1f1b"
    spec = make(p, 2 * p, 2 if kind == "interleaved" else 1, kind, dp=dp, tp=tp, cp=cp, zero=zero, gpn=4,
                nodes=p * dp * tp * cp // 4 or 1, recompute="selective")
    base = HardwareProfile.from_gpu(spec.gpu)
    field = "intra_node_GBps" if intra else "inter_node_GBps"
    faster = dataclasses.replace(base, **{field: getattr(base, field) * factor})
    assert simulate_time(spec, profile=faster).step_time_s <= simulate_time(spec, profile=base).step_time_s + 1e-12


def test_dp_overlap_hides_buckets_behind_the_backward():
    # 2 nodes, DP across IB: buckets but the last start as soon as the backward produced them.
    spec = make(1, 4, dp=16, gpn=8, nodes=2)
    r = simulate_time(spec)
    line = r.timelines[r.critical_class]
    dp_ops = [s for s in line if s.op.group == "dp"]
    last_b = max(s.end_s for s in line if s.op.kind == OpKind.BACKWARD)
    assert dp_ops and min(s.start_s for s in dp_ops) < last_b        # overlapped with the backward
    total = sum(s.duration_s for s in dp_ops)
    assert r.exposed_comm_s["dp"] < total                             # not all of it is exposed


def test_tp_collectives_are_exposed():
    spec = make(1, 2, tp=4, gpn=4)
    r = simulate_time(spec)
    tp_total = sum(s.duration_s for s in r.timelines[r.critical_class] if s.op.group == "tp")
    assert tp_total > 0 and r.exposed_comm_s["tp"] == pytest.approx(tp_total)


def test_report_fields_and_mfu_convention():
    spec = make(2, 4, dp=2, tp=2, gpn=8).model_copy(
        update={"training": TrainingSpec(global_batch=8, tokens=1e9),
                "cluster": ClusterSpec(gpus_per_node=8, price_per_gpu_hour=2.0)})
    r = simulate_time(spec)
    d = r.to_dict()
    for k in ("step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "hfu", "bubble_fraction", "exposed_comm_s",
              "compute_s_by_kind", "time_to_train_s", "cost_usd"):
        assert k in d
    assert set(d["exposed_comm_s"]) == {"tp", "cp", "pp", "dp"}
    assert d["tokens_per_s"] == pytest.approx(spec.tokens_per_step / d["step_time_s"])
    peak = spec.gpu.peak_flops["bf16"]
    assert d["mfu"] == pytest.approx(spec.model.model_flops_per_token() * d["tokens_per_s"] / 8 / peak)
    assert d["time_to_train_s"] == pytest.approx(1e9 / d["tokens_per_s"])
    assert d["cost_usd"] == pytest.approx(d["time_to_train_s"] / 3600 * 8 * 2.0)
    assert 0 < d["mfu"] < 1 and 0 < d["hfu"] < 1


def test_import_leaves_torch_out():
    code = "import sys, loom.simulator, loom.spec; sys.exit(1 if 'torch' in sys.modules or 'triton' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_no_pipeline_means_no_bubble_even_when_comm_bound():
    """Llama 3 70B with ZeRO-3 over 8 nodes and 16 micro-batches is DP-bound: the compute stream idles for seconds,
    but that idle time is exposed DP communication, not a pipeline bubble."""
    from pathlib import Path
    from loom.spec import load_spec
    r = simulate_time(load_spec(Path(__file__).resolve().parents[1] / "examples" / "llama3-70b-64xh100.toml"))
    assert r.exposed_comm_s["dp"] > 1.0
    assert r.bubble_fraction == 0.0
