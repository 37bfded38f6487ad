"""Run a plan graph: start and end time of every op, given each op's duration.

Every stream of a rank class is an in-order queue and the compiler put an edge between consecutive ops of a
stream, so the plan graph holds all constraints and the discrete-event simulation reduces to one pass in
topological order (the earliest-start schedule of a DAG whose resources are in-order queues): for op v with deps
(u, frac, tail),
    start(v) = max_u [ end(u) if frac == 1 else start(u) + frac · dur(u) ],
    end(v)   = max( start(v) + dur(v), max_u end(u) + tail · dur(v) ).
Communication overlaps computation wherever the graph lets it: ops on different streams run concurrently.
"""
from __future__ import annotations

from dataclasses import dataclass

from loom.spec.plan import Op, Plan


@dataclass(frozen=True)
class Slice:
    """One op on a timeline, seconds from the start of the step."""
    op: Op
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def run(plan: Plan, durations: list[float]) -> tuple[list[float], list[float]]:
    """(start, end) per op id; `durations` is indexed by op id."""
    preds = plan.preds()
    n = len(preds)
    start = [0.0] * n
    end = [0.0] * n
    for v in plan.topological_order():
        dv = durations[v]
        s = 0.0
        floor = 0.0
        for u, frac, tail in preds[v]:
            t = end[u] if frac >= 1.0 else start[u] + frac * durations[u]
            if t > s:
                s = t
            if tail:
                t = end[u] + tail * dv
                if t > floor:
                    floor = t
        start[v] = s
        end[v] = s + dv if s + dv > floor else floor
    return start, end


def timelines(plan: Plan, start: list[float], end: list[float]) -> dict[str, list[Slice]]:
    """Per rank class, its ops in program order with their times."""
    ops = plan.ops()
    return {rc: [Slice(ops[i], start[i], end[i]) for i in ids] for rc, ids in plan.programs.items()}
