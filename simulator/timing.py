"""simulate_time(spec) -> TimeReport: step time, throughput, MFU/HFU, bubble and exposed communication.

Definitions (stated because papers differ):
- step_time_s: from the first op to the last op's end (optimizer and post-step parameter gathers included).
- MFU: model FLOPs per token in the PaLM convention (ModelSpec.model_flops_per_token: 6·N_matmul + 12·L·q_dim·s,
  attention non-causal, no recompute) × tokens/s / (world × peak[precision]). tflops_per_gpu uses the same
  numerator. HFU: FLOPs the plan actually executes (causal attention counted as half, recompute included) per
  second per GPU / peak.
- bubble_fraction: mean over stages of (T_pipe − busy_s) / T_pipe, where T_pipe is the end of the last forward,
  backward or recompute op of any stage and busy_s the time in [0, T_pipe] during which stage s runs one of its
  forward/backward/recompute ops, its TP collectives or the collectives that feed its compute (CP exchanges,
  ZeRO gathers): waiting on those is exposed communication, not bubble; waiting for a pipeline neighbour is
  bubble. Without PP it is ~0. Uniform stages with free communication give (p−1)/(m+p−1) for
  1F1B and AFAB and (p−1)/(v·m+p−1) for interleaving (tests/test_sim_laws.py derives it).
- exposed_comm_s[dim]: on the rank class whose step ends last, the time of its communication ops of that mesh dim
  during which it runs no compute op (TP collectives sit on the compute stream: all of them count; with
  parallel.tp_comm_overlap an overlapped one lasts only its exposed part, costs.exposed_overlap).
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from loom.spec.compile import compile_plan
from loom.spec.plan import OpKind, Plan

from .costs import CostModel
from .engine import Slice, run, timelines
from .hardware import HardwareProfile

_PIPE = frozenset({OpKind.FORWARD, OpKind.BACKWARD, OpKind.RECOMPUTE})
_COMPUTE = frozenset({OpKind.FORWARD, OpKind.BACKWARD, OpKind.RECOMPUTE, OpKind.OPTIMIZER})
_BUSY = _PIPE | {OpKind.TP_ALLREDUCE, OpKind.SP_ALLGATHER, OpKind.SP_REDUCESCATTER, OpKind.CP_KV_EXCHANGE,
                 OpKind.ZERO_ALLGATHER}


@dataclass
class TimeReport:
    step_time_s: float
    tokens_per_s: float
    tflops_per_gpu: float
    mfu: float
    hfu: float
    bubble_fraction: float
    exposed_comm_s: dict[str, float]
    compute_s_by_kind: dict[str, float]
    time_to_train_s: float | None
    cost_usd: float | None
    critical_class: str
    timelines: dict[str, list[Slice]] = field(repr=False, default_factory=dict)
    plan: Plan | None = field(repr=False, default=None)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "hfu",
                                              "bubble_fraction", "exposed_comm_s", "compute_s_by_kind",
                                              "time_to_train_s", "cost_usd", "critical_class")}


def simulate_time(spec, plan: Plan | None = None, profile: HardwareProfile | dict | None = None,
                  durations: list[float] | None = None) -> TimeReport:
    """Cost and run one step. `durations` (indexed by op id, seconds) overrides the cost model (tests of laws)."""
    plan = plan or compile_plan(spec)
    hw = HardwareProfile.resolve(spec.gpu, profile)
    if durations is None:
        cost = CostModel(spec, hw, plan.mesh)
        durations = [cost.duration(op) for op in plan.ops()]
    start, end = run(plan, durations)
    lines = timelines(plan, start, end)
    step = max(end)
    world = spec.world_size
    tokens_per_s = spec.tokens_per_step / step
    peak = hw.peak(spec.training.precision)
    model_flops = spec.model.model_flops_per_token() * tokens_per_s / world
    hw_flops = plan.total_flops() / step / world
    critical = max(lines, key=lambda rc: max(s.end_s for s in lines[rc]))
    by_kind: dict[str, float] = {}
    for s in lines[critical]:
        if s.op.kind in _COMPUTE:
            by_kind[s.op.kind.value] = by_kind.get(s.op.kind.value, 0.0) + durations[s.op.id]
    tokens = spec.training.tokens
    ttt = tokens / tokens_per_s if tokens else None
    price = spec.gpu.price_per_gpu_hour
    cost_usd = ttt / 3600 * world * price if ttt is not None and price else None
    return TimeReport(step_time_s=step, tokens_per_s=tokens_per_s, tflops_per_gpu=model_flops / 1e12,
                      mfu=model_flops / peak, hfu=hw_flops / peak,
                      bubble_fraction=bubble_fraction(lines, durations),
                      exposed_comm_s=exposed_comm(lines[critical], durations), compute_s_by_kind=by_kind,
                      time_to_train_s=ttt, cost_usd=cost_usd, critical_class=critical, timelines=lines, plan=plan)


def bubble_fraction(lines: dict[str, list[Slice]], durations: list[float]) -> float:
    pipe_end = max((s.end_s for sl in lines.values() for s in sl if s.op.kind in _PIPE), default=0.0)
    if pipe_end <= 0:
        return 0.0
    fracs = []
    for sl in lines.values():
        # Busy: its own forward/backward/recompute and TP collectives, and any non-pipeline collective in flight
        # (CP exchanges, ZeRO gathers, DP buckets queued ahead of them on the comm stream): waiting on those is
        # exposed communication, reported separately. What is left is waiting on the pipeline.
        busy = merge_intervals([(s.end_s - durations[s.op.id], s.end_s) for s in sl
                       if s.op.kind in _BUSY or (s.op.group is not None and s.op.group != "pp")])
        covered = sum(min(b, pipe_end) - a for a, b in busy if a < pipe_end)
        fracs.append(max(0.0, pipe_end - covered) / pipe_end)
    return sum(fracs) / len(fracs)


def merge_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted disjoint union of (start, end) intervals; empty ones dropped (they cover nothing)."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def exposed_comm(line: list[Slice], durations: list[float]) -> dict[str, float]:
    """Per mesh dim, the part of each comm op's interval with no compute op running on this class."""
    # A compute op stretched by a pipelined dependency (tail) waits at its start: its work is the last `dur` s.
    busy = merge_intervals([(s.end_s - durations[s.op.id], s.end_s) for s in line if s.op.kind in _COMPUTE])
    starts = [x for x, _ in busy]
    out = {"tp": 0.0, "cp": 0.0, "pp": 0.0, "dp": 0.0}
    for s in line:
        if s.op.group is None or s.op.kind in _COMPUTE:
            continue
        a, b = s.end_s - durations[s.op.id], s.end_s
        if b <= a:
            continue
        covered = 0.0
        for k in range(max(0, bisect_right(starts, a) - 1), len(busy)):   # merged intervals are disjoint
            x, y = busy[k]
            if x >= b:
                break
            covered += max(0.0, min(b, y) - max(a, x))
        out[s.op.group] += (b - a) - covered
    return out
