"""The rows of `loom verify`: each prediction (simulator, memory model, loom.verify_predict) beside its measurement
(the executor's JSON from loom.executor.measure), as `Row`s judged against relative tolerances. loom/verify.py runs
the executor and prints them.

Which prediction each row holds (docs/verify.md says why):
- step time, tokens/s, bubble fraction, exposed comm: the step-time simulator. Measured: mean over the steps
  after the first (warm-up) of the slowest rank's step; bubble and exposed comm from the measured op timeline by
  the simulator's own definitions (loom.simulator.timing.bubble_fraction on measured slices; exposed comm = comm
  time not covered by compute, per mesh dim).
- comm bytes per kind: exact predictions of the executor's collectives (loom.verify_predict), with the plan's
  figures in the `plan`/`model` column and the reason wherever they differ.
- parameter / gradient / optimizer bytes per stage: the memory model (simulator/memory.py stage_memory), whose
  layout is the executor's (padded units, ZeRO-1's in-place reduced full buffer, ZeRO-2/3's shard accumulator);
  equal for every precision and optimizer since bf16 runs Megatron's layout (verify_predict.state_notes).
- activation bytes and peak memory: the memory model (simulator/memory.py) with the assumptions that describe the
  executor's kernels (`verify_predict.EXECUTOR_ACTIVATIONS`; the default assumptions' figure beside it).
Tolerances (relative): `DEFAULT_TOLERANCES`, overridden by the spec's [verify] table, then by --tol on the CLI.
A metric with no tolerance is reported, not judged.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from loom import verify_predict as vp

from loom.spec.spec import VerifySpec
from loom.verify_timeline import _representatives, measured_exposed_comm, measured_slices

# One source of truth: the [verify] table's defaults (spec/spec.py).
DEFAULT_TOLERANCES: dict[str, float | None] = VerifySpec().model_dump()


ACTIVATION_NOTE = ("memory model (Korthikanti §4.1 terms; recompute: simulator/activations.py layer_bytes) with the "
                   "executor's kernels (FlashAttention, SwiGLU keeping gate and up, norm statistics: "
                   "verify_predict.EXECUTOR_ACTIVATIONS) vs what the executor keeps for backward (saved tensors, "
                   "checkpoint inputs, the selective-checkpoint cache; by storage); model column: the default "
                   "assumptions (eager SwiGLU, no norm statistics)")
TRANSIENT_NOTE = ("one recomputed layer's rebuilt tensors beyond what it kept (simulator/activations.py "
                  "recompute_transient_bytes, executor's kernels) vs the most live bytes a checkpoint's recompute "
                  "added over those live when its backward began; model column: the memory model's workspace "
                  "(the larger of this and the loss backward's transient)")


def _max_known(values: list) -> float | None:
    """The largest value, or None (not judged) when a rank could not measure it (an older measurement, or torch's
    checkpoint internals that executor/measure.py hooks have changed)."""
    return None if any(v is None for v in values) else max(values)


def _recompute_transient(spec) -> float:
    """One recomputed layer's transient for the executor's kernels (the memory model's workspace term)."""
    from loom.simulator.activations import recompute_transient_bytes
    from loom.simulator.memory import activation_bytes
    m, p, t = spec.model, spec.plan, spec.training
    tokens = m.seq_len / p.cp * t.micro_batch
    return recompute_transient_bytes(m, tokens, activation_bytes(t.precision), p.tp, p.sp, t.recompute,
                                     vp.EXECUTOR_ACTIVATIONS)


@dataclass
class Row:
    metric: str
    predicted: float | None
    measured: float | None
    tolerance: float | None          # relative; None: reported only
    unit: str = ""
    reference: float | None = None   # the plan's or the memory model's figure where `predicted` is the executor's
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.predicted is None or self.measured is None:
            return None
        if self.predicted == 0:
            return 1.0 if self.measured == 0 else None        # undefined (and not valid JSON as inf)
        return self.measured / self.predicted

    @property
    def ok(self) -> bool | None:
        if self.tolerance is None or self.predicted is None or self.measured is None:
            return None
        if self.tolerance == 0:
            return self.measured == self.predicted
        return abs(self.measured - self.predicted) <= self.tolerance * abs(self.predicted)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(ratio=self.ratio, ok=self.ok)
        return d



# ---- the comparison ---------------------------------------------------------------------------------------------
def tolerances(spec, overrides: dict[str, float | None] | None = None) -> dict[str, float | None]:
    tol = dict(DEFAULT_TOLERANCES)
    v = getattr(spec, "verify", None)
    if v is not None:
        tol.update(v.model_dump())
    tol.update(overrides or {})
    return tol


def compare(spec, measured: dict, profile: Any = None, tol: dict[str, float | None] | None = None) -> list[Row]:
    """Rows of the verify table for `measured` (the executor's JSON: {"ranks": [...]})."""
    from loom.simulator import simulate_time
    from loom.simulator.memory import memory_report
    from loom.simulator.timing import bubble_fraction
    from loom.spec.compile import compile_plan
    tol = tol or tolerances(spec)
    plan = compile_plan(spec)
    sim = simulate_time(spec, plan=plan, profile=profile)
    mem = memory_report(spec, vp.EXECUTOR_ACTIVATIONS)     # what the executor's kernels keep
    mem_default = memory_report(spec)                        # the memory model's default (production) assumptions
    ranks = measured["ranks"]
    reps = _representatives(ranks)
    n_steps = len(ranks[0]["steps"])
    timed = list(range(1, n_steps)) or [0]                 # step 0 is warm-up
    cuda = ranks[0]["device"].startswith("cuda")
    # the peak rows (CUDA): with the executor's loss on that device (one GPU without TP: the fused kernel)
    cuda_mem = memory_report(spec, vp.executor_assumptions(spec, ranks[0]["device"])) if cuda else mem
    rows: list[Row] = []
    warm = f"mean of {len(timed)} step(s) after 1 warm-up" if n_steps > 1 else "1 step, no warm-up (use --steps >= 2)"

    # ---- time
    step_s = sum(max(r["steps"][i]["time_s"] for r in ranks) for i in timed) / len(timed)
    t_tol = tol["step_time_gpu" if cuda else "step_time_cpu"]
    rows.append(Row("step time", sim.step_time_s, step_s, t_tol, "s", note=warm + "; slowest rank"))
    rows.append(Row("tokens/s", sim.tokens_per_s, spec.tokens_per_step / step_s, t_tol, "tok/s"))
    bubbles, exposed = [], []
    for i in timed:
        lines, busy = {}, {}
        for stage, r in reps.items():
            sl, b = measured_slices(plan, r["steps"][i])
            lines[f"stage{stage}"] = sl
            busy.update(b)
        durations = [busy.get(k, 0.0) for k in range(len(plan))]
        bubbles.append(bubble_fraction(lines, durations))
        slowest = max(ranks, key=lambda r: r["steps"][i]["time_s"])
        exposed.append(measured_exposed_comm(plan, slowest["steps"][i]))
    sim_bubble = sim.bubble_fraction if sim.bubble_fraction > 1e-12 else 0.0     # float dust of a no-PP plan
    # where the time goes: compute per kind on the slowest rank (busy time: pipeline receive waits excluded)
    by_kind: dict[str, list[float]] = {}
    for i in timed:
        slowest = max(ranks, key=lambda r: r["steps"][i]["time_s"])
        _, busy = measured_slices(plan, slowest["steps"][i])
        acc: dict[str, float] = {}
        for op_id, dur in busy.items():
            k = plan.op(op_id).kind.value
            if plan.op(op_id).is_compute:
                acc[k] = acc.get(k, 0.0) + dur
        for k, v in acc.items():
            by_kind.setdefault(k, []).append(v)
    for k in ("forward", "backward", "recompute", "optimizer"):
        if k in by_kind or k in sim.compute_s_by_kind:
            meas = sum(by_kind.get(k, [0.0])) / max(1, len(by_kind.get(k, [])))
            rows.append(Row(f"compute time {k}", sim.compute_s_by_kind.get(k, 0.0), meas, None, "s",
                            note="per step, slowest rank; TP/SP collectives inside it" if k != "optimizer" else
                            "per step, slowest rank"))
    rows.append(Row("bubble fraction", sim_bubble, sum(bubbles) / len(bubbles), tol["bubble"], "",
                    note="loom.simulator.timing.bubble_fraction on the measured op times"))
    for d in ("tp", "cp", "pp", "dp"):
        if spec.plan.degree(d) > 1:
            meas = sum(e[d] for e in exposed) / len(exposed)
            rows.append(Row(f"exposed comm {d}", sim.exposed_comm_s.get(d, 0.0), meas, tol["exposed_comm"], "s",
                            note="slowest rank" + ("; CP waits inside attention count as compute"
                                                   if d == "cp" else "")))

    # ---- comm bytes per stage and kind (last measured step)
    notes = vp.comm_notes(spec)
    for stage in range(spec.plan.pp):
        exact = vp.comm_bytes(spec, stage, ranks[0]["device"])
        planned = vp.plan_comm_bytes(plan, stage)
        stage_ranks = [r for r in ranks if r["stage"] == stage]
        per_rank = []
        for r in stage_ranks:
            got: dict[str, int] = {}
            for rec in r["steps"][-1]["comm"]:
                k = vp.classify(rec)
                if k is not None:
                    got[k] = got.get(k, 0) + rec["bytes"]
            per_rank.append(got)
        got = per_rank[0] if per_rank else {}
        disagree = [k for k in set().union(*per_rank) if len({g.get(k, 0) for g in per_rank}) > 1]
        keys = [k for k in vp.COMM_ROWS if exact.get(k) or got.get(k) or planned.get(k)]
        keys += sorted(k for k in got if k not in vp.COMM_ROWS)          # unclassified: a mismatch to look at
        for k in keys:
            ref = planned.get(k) if k in vp.PLAN_KINDS else None
            note = ""
            if ref is not None and round(ref) != exact.get(k, 0):
                note = "plan differs: " + (notes.get(k) or "for no known reason: a mismatch to look at")
            elif k not in vp.PLAN_KINDS:
                note = notes.get(k, "not classified: executor collective with no predicted row")
            if k in disagree:
                note += "; ranks of this stage disagree"
            rows.append(Row(f"comm bytes {k} (stage {stage})", exact.get(k) if k in vp.COMM_ROWS else None,
                            got.get(k, 0), tol["comm_bytes"], "B", ref, note.strip("; ")))

    # ---- model states and activations per stage
    for stage in range(spec.plan.pp):
        r = reps.get(stage)
        if r is None:
            continue
        m = r["memory"]
        st = mem.per_stage[stage]
        # the memory model's own figure is the prediction (its layout is the executor's: padded units, ZeRO-1's
        # full gradient buffer reduced in place, ZeRO-2/3's shard accumulator); the notes name known differences
        exact = vp.state_elements(spec, stage)
        for key in ("params", "grads", "optimizer"):
            rows.append(Row(f"{key} bytes (stage {stage})", getattr(st, key), m[key], tol["model_states"], "B",
                            None, vp.state_notes(spec, key)))
        rows.append(Row(f"param elements (stage {stage})", exact["param_elements"], m["param_elements"],
                        tol["model_states"], "n", None, f"padded to {exact['padded_elements']}"))
        per_mb = sum(s["saved_layers_bytes"] for s in [r["steps"][i] for i in timed]) / len(timed) \
            / spec.micro_batches
        layers = st.layers
        pred_layers = st.activations / st.microbatches_in_flight if st.microbatches_in_flight else 0.0
        st0 = mem_default.per_stage[stage]
        default_layers = st0.activations / st0.microbatches_in_flight if st0.microbatches_in_flight else 0.0
        rows.append(Row(f"activation bytes per micro-batch, {layers} layers (stage {stage})", pred_layers, per_mb,
                        tol["activations"], "B", default_layers, ACTIVATION_NOTE))
        peak_saved = max(r["steps"][i]["saved_peak_bytes"] for i in timed)
        per_mb_all = sum(r["steps"][i]["saved_layers_bytes"] + r["steps"][i]["saved_other_bytes"]
                         for i in timed) / len(timed) / spec.micro_batches
        rows.append(Row(f"micro-batches in flight (stage {stage})", st.microbatches_in_flight,
                        peak_saved / per_mb_all if per_mb_all else None, None, "", None,
                        "reported, not judged: peak saved bytes / saved bytes per micro-batch, a ratio of "
                        "averages (the loss buffers live for fewer micro-batches than the layers'; interleaved "
                        "stage 1: 1.42 for 1.5); the exact check is 'activation bytes in flight'"))
        model_flight = st.activations + st.logits_buffers + st.embedding_buffers
        pred_flight = model_flight + vp.executor_buffer_extras(spec, stage)
        rows.append(Row(f"activation bytes in flight (stage {stage})", pred_flight, peak_saved, tol["activations"],
                        "B", model_flight, f"{st.microbatches_in_flight:g} micro-batches in flight (memory model); "
                        "predicted adds the executor's norm statistics, CE targets and masks "
                        "(verify_predict.executor_buffer_extras)"))
        if spec.training.recompute != "none" and layers:
            rows.append(Row(f"recompute transient bytes (stage {stage})", _recompute_transient(spec),
                            _max_known([r["steps"][i].get("recompute_transient_bytes") for i in timed]),
                            tol["activations"], "B", st.workspace, TRANSIENT_NOTE))
        if cuda and "max_memory_reserved" in m:
            from loom.simulator.memory import FRAGMENTATION
            # The memory model's peak = allocated + overhead, overhead = CUDA context + 5 % fragmentation
            # (simulator/memory.py): allocated compares with max_memory_allocated, allocated + fragmentation with
            # max_memory_reserved (the caching allocator's pool); the context is outside both.
            # On one GPU without TP the executor's loss is the fused kernel (memory model loss "fused_chunked")
            cuda_st = cuda_mem.per_stage[stage]
            why = "; loss: fused_chunked (verify_predict.executor_assumptions)" \
                if vp.uses_fused_loss(spec, ranks[0]["device"]) else ""
            allocated = cuda_st.peak - cuda_st.overhead
            rows.append(Row(f"peak memory allocated (stage {stage})", allocated, m["max_memory_allocated"],
                            tol["peak_memory"], "B", st.peak,
                            "memory model peak without context and fragmentation" + why))
            rows.append(Row(f"peak memory reserved (stage {stage})", allocated * (1 + FRAGMENTATION),
                            m["max_memory_reserved"], tol["peak_memory"], "B", st.peak,
                            "memory model peak without the CUDA context (not seen by the allocator)" + why))
    return rows
