"""Communication overlaps in the plan and the simulator: parallel.tp_comm_overlap (TransformerEngine userbuffers,
TP collectives inside their GEMMs) and parallel.overlap_param_gather (the distributed optimizer's parameter
all-gather behind the next forward). The exposure formulas are checked against an independent chunk-by-chunk
schedule, the plan against the unoverlapped plan, the event simulator against the derivations, and the fast path
against the event simulator."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.simulator import simulate_time
from loom.simulator.costs import CostModel, exposed_overlap
from loom.simulator.fast_cost import fast_step
from loom.simulator.hardware import HardwareProfile
from loom.spec.compile import compile_plan
from loom.spec.load import spec_from_dict
from loom.spec.plan import OpKind
from loom.spec.strategies import valid_specs

ROOT = Path(__file__).resolve().parents[1]
TP_KINDS = (OpKind.TP_ALLREDUCE, OpKind.SP_ALLGATHER, OpKind.SP_REDUCESCATTER)


def chunk_schedule(method: str, comm: float, gemm: float, k: int) -> float:
    """Seconds the GEMM + collective pair takes, event by event (independent of costs.exposed_overlap):
    ring: k GEMM steps, step i needs chunk i, chunk 0 is local, chunk i arrives one transfer (comm/(k-1)) after
    chunk i-1 (the ring forwards what it just received); pipeline: k GEMM chunks in a row, chunk i's collective
    (comm/k) after GEMM chunk i and after collective i-1; bulk: both side by side."""
    if method == "bulk":
        return max(comm, gemm)
    g = gemm / k
    if method == "ring":
        arrive, end = 0.0, 0.0
        for i in range(k):
            if i:
                arrive += comm / (k - 1)
            end = max(end, arrive) + g
        return end
    end_gemm = end_comm = 0.0
    for _ in range(k):
        end_gemm += g
        end_comm = max(end_comm, end_gemm) + comm / k
    return end_comm


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["ring", "pipeline", "bulk"]), st.floats(0.0, 10.0), st.floats(1e-3, 10.0),
       st.sampled_from([2, 4, 8]))
def test_exposure_formula_equals_the_chunk_schedule(method, comm, gemm, k):
    exposed = exposed_overlap(method, comm, gemm, k if method != "bulk" else 1)
    assert exposed == pytest.approx(chunk_schedule(method, comm, gemm, k) - gemm, abs=1e-9)
    assert 0.0 <= exposed <= comm + 1e-12                # never worse than running the collective alone


def test_exposure_short_and_long_collectives():
    # shorter than its GEMM: a ring exchange hides entirely, a pipelined reduce-scatter leaves its last chunk
    assert exposed_overlap("ring", 0.5, 1.0, 8) == 0.0
    assert exposed_overlap("pipeline", 0.5, 1.0, 4) == pytest.approx(0.5 / 4)
    assert exposed_overlap("bulk", 0.5, 1.0, 1) == 0.0
    # longer: what the GEMM cannot cover (ring: the first GEMM step is on the local chunk, k-1 transfers remain)
    assert exposed_overlap("bulk", 3.0, 1.0, 1) == pytest.approx(2.0)
    assert exposed_overlap("ring", 3.0, 1.0, 4) == pytest.approx(3.0 - 1.0 * 3 / 4)
    assert exposed_overlap("pipeline", 3.0, 1.0, 4) == pytest.approx(3.0 - 1.0 * 3 / 4)


def _spec(**parallel):
    """Llama 3 8B on one node of H100 (NVLink TP), or as overridden."""
    cluster = parallel.pop("cluster", {"gpu": "H100-SXM", "gpus_per_node": parallel.get("tp", 8), "nodes": 1})
    training = {"global_batch": 16, "micro_batch": 1, "recompute": parallel.pop("recompute", "selective")}
    return spec_from_dict({"model": {"preset": "llama3-8b"}, "cluster": cluster, "training": training,
                           "parallel": {"dp": 1, "tp": 8, "sp": True} | parallel})


def _tp_ops(plan):
    return [op for op in plan.ops() if op.kind in TP_KINDS]


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_plan_splits_tp_ops_by_gemm_keeping_calls_and_bytes(recompute):
    plain, over = (compile_plan(_spec(recompute=recompute, tp_comm_overlap=o)) for o in (False, True))
    for kind in TP_KINDS:
        for attr in ("count", "wire_bytes"):
            a = sum(getattr(op, attr) for op in _tp_ops(plain) if op.kind == kind)
            b = sum(getattr(op, attr) for op in _tp_ops(over) if op.kind == kind)
            assert b == pytest.approx(a), (kind, attr)
    m = over.spec.model
    toks = m.seq_len / 8                                         # tokens per rank of one micro-batch (tp = 8)
    h, q, kv, f = m.hidden, m.q_dim, m.kv_dim, m.ffn_hidden
    gemm = {"qkv": 2 * h * (q + 2 * kv) * toks, "proj": 2 * q * h * toks, "fc1": 2 * h * 2 * f * toks,
            "fc2": 2 * f * h * toks}                             # per layer and call; SwiGLU: gate and up
    per_call = {}
    for op in _tp_ops(over):
        if op.overlap:
            per_call.setdefault((op.kind, op.overlap), set()).add(round(op.overlap_flops / op.count))
    # TE's defaults: AG ring with QKV/FC1 (forward) and proj/FC2 dgrad (backward); RS pipelined after proj/FC2;
    # RS bulk beside the QKV/FC1 wgrad
    r = {k: round(v) for k, v in gemm.items()}
    assert per_call[(OpKind.SP_ALLGATHER, "ring")] == {r["qkv"], r["fc1"], r["proj"], r["fc2"]}
    assert per_call[(OpKind.SP_REDUCESCATTER, "pipeline")] == {r["proj"], r["fc2"]}
    assert per_call[(OpKind.SP_REDUCESCATTER, "bulk")] == {r["qkv"], r["fc1"]}
    assert all(op.stream == "compute" for op in _tp_ops(over))
    assert {op.overlap for op in _tp_ops(over)} == {"", "ring", "pipeline", "bulk"}
    assert all(op.overlap_splits == 8 for op in _tp_ops(over) if op.overlap == "ring")
    assert all(op.overlap_splits == 4 for op in _tp_ops(over) if op.overlap == "pipeline")


def test_short_collectives_cost_only_their_exposed_chunk():
    """tp = 2 over a 900 GB/s link: every per-layer collective is shorter than its GEMM, so a ring all-gather
    costs nothing, a pipelined reduce-scatter its last quarter, a bulk one nothing; the step shrinks by exactly
    the hidden time (one stage, no other stream on the critical path)."""
    fast = {"gpu": "H100-SXM", "gpus_per_node": 2, "nodes": 1, "intra_node_GBps": 900.0}
    spec = _spec(tp=2, tp_comm_overlap=True, cluster=dict(fast))
    rep, plain = simulate_time(spec), simulate_time(_spec(tp=2, cluster=dict(fast)))
    cost = CostModel(spec, HardwareProfile.resolve(spec.gpu, None), rep.plan.mesh)
    dur = {s.op.id: s.duration_s for s in rep.timelines["stage0"]}
    hidden = 0.0
    for op in _tp_ops(rep.plan):
        c = cost.comm_time(op)
        if op.overlap:                           # short, as stated: no transfer outlasts its GEMM chunk
            g, k = cost.gemm_time(op.overlap_flops), op.overlap_splits
            limit = g * (k - 1) / k if op.overlap == "ring" else g        # pipeline: last chunk only iff c <= g
            assert c <= limit
        expect = {"": c, "ring": 0.0, "pipeline": c / 4, "bulk": 0.0}[op.overlap]
        assert dur[op.id] == pytest.approx(expect, rel=1e-9, abs=1e-15), op.label
        hidden += c - expect
    assert hidden > 0
    assert plain.step_time_s - rep.step_time_s == pytest.approx(hidden, rel=1e-6)
    assert rep.exposed_comm_s["tp"] < plain.exposed_comm_s["tp"]


def test_long_collectives_expose_the_difference():
    """TP over a slow 5 GB/s link: each collective outlasts its GEMM and shows what the GEMM does not cover."""
    spec = _spec(tp_comm_overlap=True, cluster={"gpu": "H100-SXM", "gpus_per_node": 8, "nodes": 1,
                                               "intra_node_GBps": 5.0})
    rep = simulate_time(spec)
    cost = CostModel(spec, HardwareProfile.resolve(spec.gpu, None), rep.plan.mesh)
    dur = {s.op.id: s.duration_s for s in rep.timelines["stage0"]}
    seen = set()
    for op in _tp_ops(rep.plan):
        if not op.overlap:
            continue
        c, g, k = cost.comm_time(op), cost.gemm_time(op.overlap_flops), op.overlap_splits
        assert c > g
        expect = {"bulk": c - g, "ring": c - g * (k - 1) / k, "pipeline": c - g * (k - 1) / k}[op.overlap]
        assert dur[op.id] == pytest.approx(expect, rel=1e-9), op.label
        seen.add(op.overlap)
    assert seen == {"ring", "pipeline", "bulk"}


def _zero1(dp_link_GBps: float | None, **kw):
    """dp = 2 over two nodes (the gather crosses the inter-node link), tp 8 inside each, one stage."""
    cluster = {"gpu": "H100-SXM", "gpus_per_node": 8, "nodes": 2, "inter_node_GBps": dp_link_GBps}
    return spec_from_dict({"model": {"preset": "llama3-8b"}, "cluster": cluster,
                           "training": {"global_batch": 16, "micro_batch": 1},
                           "parallel": {"dp": 2, "tp": 8, "sp": True, "zero": 1, **kw}})


@pytest.mark.parametrize("link, longer", [(400.0, False), (2.0, True)])
def test_param_gather_hides_behind_the_first_forward_up_to_its_length(link, longer):
    """Without the option the gather (G, k bucket calls) follows the optimizer. With it, it runs bucket by bucket
    ahead of the first forward (F): that forward starts after the first bucket and ends no earlier than one bucket's
    work after the last, so the step saves G - max(G/k, G + F/k - F): all but the first bucket when G < F, only
    F(1 - 1/k) when the gather is longer than the forward."""
    plain, over = simulate_time(_zero1(link)), simulate_time(_zero1(link, overlap_param_gather=True))
    gather = [s for s in plain.timelines["stage0"] if s.op.kind == OpKind.ZERO_ALLGATHER]
    assert len(gather) == 1 and gather[0].start_s >= max(s.end_s for s in plain.timelines["stage0"]
                                                         if s.op.kind == OpKind.OPTIMIZER)
    g, k = gather[0].duration_s, gather[0].op.count
    first = next(s for s in over.timelines["stage0"] if s.op.kind == OpKind.ZERO_ALLGATHER)
    assert first.start_s == 0.0 and first.op.count == k and first.duration_s == pytest.approx(g)
    f = next(s for s in over.timelines["stage0"] if s.op.kind == OpKind.FORWARD).op
    fwd = CostModel(over.plan.spec, HardwareProfile.resolve(over.plan.spec.gpu, None),
                    over.plan.mesh).duration(f)
    assert (g > fwd) == longer
    saved = g - max(g / k, g + fwd / k - fwd)
    assert plain.step_time_s - over.step_time_s == pytest.approx(saved, rel=1e-6)
    assert saved <= min(g, fwd) + 1e-12


def test_param_gather_under_pipeline_stretches_every_stage_first_forward():
    """Megatron-LM without interleaving dispatches a stage's first bucket in its first forward's pre-hook and
    each next one as the previous arrives (param_and_grad_buffer.py finish_param_sync): a gather longer than one
    micro-batch's forward stretches that forward on every stage, and the pipeline fill passes them all. With a
    slow DP link this costs more than the post-optimizer gather it replaces - Loom reports it, not hides it."""
    cluster = {"gpu": "H100-SXM", "gpus_per_node": 8, "nodes": 4, "inter_node_GBps": 5.0}
    d = {"model": {"preset": "llama3-8b"}, "cluster": cluster, "training": {"global_batch": 64, "micro_batch": 1},
         "parallel": {"dp": 2, "tp": 8, "pp": 2, "sp": True, "zero": 1}}
    plain = simulate_time(spec_from_dict(d))
    d["parallel"]["overlap_param_gather"] = True
    over = simulate_time(spec_from_dict(d))
    assert over.step_time_s > plain.step_time_s
    # each stage's gather starts when its first input is there (stage 1: after stage 0's first send)
    g1 = next(s for s in over.timelines["stage1"] if s.op.kind == OpKind.ZERO_ALLGATHER)
    recv = next(s for s in over.timelines["stage1"] if s.op.kind == OpKind.PP_RECV_ACT)
    assert g1.start_s >= recv.end_s > 0


@settings(max_examples=25, deadline=None)
@given(valid_specs())
def test_overlap_never_slower_never_below_compute(spec):
    """With both options on where valid, the step is no longer than without (TP: the split ops carry the same
    calls and bytes, each charged at most its collective; the param gather without PP, see the test above) and
    no shorter than the busiest stage's compute."""
    p = spec.plan
    on = spec.with_parallel(tp_comm_overlap=p.sp, overlap_param_gather=p.zero >= 1 and p.dp * p.cp > 1 and p.pp == 1)
    off = spec.with_parallel(tp_comm_overlap=False, overlap_param_gather=False)
    r_on, r_off = simulate_time(on), simulate_time(off)
    assert r_on.step_time_s <= r_off.step_time_s * (1 + 1e-9)
    compute = max(sum(s.duration_s for s in line if s.op.is_compute) for line in r_on.timelines.values())
    assert r_on.step_time_s >= compute * (1 - 1e-9)


@pytest.mark.parametrize("par", [
    dict(pp=4, schedule="interleaved", vpp=2, tp=4, zero=1, recompute="selective"),
    dict(pp=2, schedule="interleaved", vpp=4, tp=8, zero=2, recompute="none"),
    dict(pp=4, schedule="1f1b", vpp=1, tp=2, zero=1, recompute="full"),
    dict(pp=1, schedule="1f1b", vpp=1, tp=8, zero=1, recompute="full"),
    dict(pp=1, schedule="afab", vpp=1, tp=4, zero=2, recompute="selective"),
    dict(pp=2, schedule="afab", vpp=1, tp=4, zero=1, recompute="none"),
])
def test_fast_path_within_5_percent_with_overlaps(par):
    par = dict(par)
    rec = par.pop("recompute")
    d = {"model": {"preset": "llama3-8b"}, "cluster": {"gpu": "H100-SXM", "gpus_per_node": 8, "nodes": 8},
         "training": {"global_batch": 256, "micro_batch": 1, "recompute": rec},
         "parallel": {"dp": 64 // (par["pp"] * par["tp"]), "sp": True, "tp_comm_overlap": True,
                      "overlap_param_gather": True, **par}}
    spec = spec_from_dict(d)
    ev, fast = simulate_time(spec).step_time_s, fast_step(spec).step_time_s
    assert fast == pytest.approx(ev, rel=0.05)


def _megatron_rows():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sim_accuracy import RUNS, spec_for_run
    runs = [r for r in json.loads(RUNS.read_text()) if "megatron" in r["source"].lower()]
    out = []
    for r in runs:
        try:
            out.append((r, spec_for_run(r)))
        except ValueError:                       # the strong-scaling rows state no layout
            continue
    return out


def test_megatron_rows_map_to_the_overlaps_their_flags_name():
    rows = _megatron_rows()
    assert len(rows) == 9
    for run, spec in rows:
        p = spec.plan
        assert p.tp_comm_overlap == (p.tp > 1) and p.sp == (p.tp > 1)
        assert p.overlap_param_gather and p.zero == 1            # dp = 48 in every row
        assert fast_step(spec).step_time_s == pytest.approx(simulate_time(spec).step_time_s, rel=0.05)
