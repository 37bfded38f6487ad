"""What to change when a plan does not fit: the nearest plans on the same cluster that do.

A plan that does not fit is a user error with a fix, so `loom simulate` names the fields to change rather than
only printing a negative headroom. Neighbours are one or two of these moves from the user's plan (the cluster and
global batch stay as written):
  - ZeRO one or more stages higher (needs dp·cp > 1: ZeRO shards over dp·cp);
  - stronger activation recompute (none → selective → full);
  - a smaller micro-batch (halved, while it divides the global batch);
  - a factor 2 moved from dp to tp (within a node, with sequence parallelism), to pp, or to cp.
Every neighbour passes the spec's own validation (loom.spec.validate.check) before it is priced. Those that fit
are ranked by the number of moves (one before two), then by the closed-form step time (fast_cost.fast_step, the search's
fast path). When no neighbour fits, the floor says whether any plan can: parameters, gradients and optimizer
states sharded over every GPU of the cluster (ZeRO-3 over dp·cp with tp·pp splitting the rest — the states
divide by the world size either way) are a lower bound on the peak (Rajbhandari et al. 2020, ZeRO §5.1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from loom.spec.spec import Spec
from loom.spec.validate import check

from .activations import DEFAULT, ActivationAssumptions
from .fast_cost import fast_step, mfu
from .memory import grad_bytes, memory_report, optimizer_bytes, param_bytes

# recompute policies keeping less, in order (per-op "op" keeps less than selective: simulator/activations.py)
_STRONGER = {"none": ("selective", "op", "full"), "selective": ("op", "full"), "op": ("full",), "full": ()}
MAX_SHOWN = 3


@dataclass(frozen=True)
class Alternative:
    changes: dict[str, object]    # spec field ("parallel.zero", "training.micro_batch", ...) -> new value
    peak_bytes: int
    step_time_s: float
    mfu: float


@dataclass(frozen=True)
class FitAdvice:
    hbm_bytes: int
    alternatives: list[Alternative]   # fitting neighbours, best first (at most MAX_SHOWN)
    states_floor_bytes: int       # params + grads + optimizer states / world size: no plan on this cluster is lower

    @property
    def any_plan_can_fit(self) -> bool:
        return self.states_floor_bytes < self.hbm_bytes


def _moves(spec: Spec) -> list[dict[str, object]]:
    """One-field-group changes of the user's plan (each a dict of spec fields → values)."""
    p, t, c = spec.plan, spec.training, spec.cluster
    out: list[dict[str, object]] = []
    if p.dp * p.cp > 1:
        out += [{"parallel.zero": z} for z in range(p.zero + 1, 4)]
    out += [{"training.recompute": r} for r in _STRONGER[t.recompute]]
    b = t.micro_batch // 2
    while b >= 1:
        out.append({"training.micro_batch": b})
        b //= 2
    if p.dp % 2 == 0:
        if p.tp * 2 <= c.gpus_per_node:
            out.append({"parallel.dp": p.dp // 2, "parallel.tp": p.tp * 2, "parallel.sp": True})
        sched = {} if p.pp > 1 else {"parallel.schedule": "1f1b"}
        out.append({"parallel.dp": p.dp // 2, "parallel.pp": p.pp * 2, **sched})
        out.append({"parallel.dp": p.dp // 2, "parallel.cp": p.cp * 2})
    return out


def _apply(spec: Spec, changes: dict[str, object]) -> Spec | None:
    """The spec with `changes`, or None when it fails the spec's validation."""
    par = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("parallel.")}
    tra = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("training.")}
    try:
        new = spec.with_parallel(**par) if par else spec
        if tra:
            new = new.model_copy(update={"training": new.training.model_copy(update=tra)})
    except ValueError:             # pydantic rejects the combination outright
        return None
    return None if check(new) else new


def _combine(a: dict[str, object], b: dict[str, object]) -> dict[str, object] | None:
    """Two moves together, unless they set the same field (then the pair is not a new plan)."""
    if set(a) & set(b):
        return None
    return {**a, **b}


def states_floor(spec: Spec) -> int:
    """Bytes per GPU of params + grads + optimizer states with everything sharded over every GPU."""
    n = spec.model.param_count()
    per_param = param_bytes(spec.training.precision) + grad_bytes(spec) + optimizer_bytes(spec)
    return math.ceil(n * per_param / spec.world_size)


def advise(spec: Spec, assumptions: ActivationAssumptions = DEFAULT) -> FitAdvice:
    """Neighbouring plans that fit (see the module docstring); call on a validated spec with a concrete plan.
    `assumptions`: what the kernels that will run keep (`loom run` passes the executor's)."""
    hbm = spec.gpu.hbm_bytes
    moves = _moves(spec)
    candidates = [(1, m) for m in moves] + [(2, c) for i, a in enumerate(moves) for b in moves[i + 1:]
                                            if (c := _combine(a, b)) is not None]
    seen: set[tuple] = set()
    fits: list[tuple[int, Alternative]] = []
    for n_moves, changes in candidates:
        key = tuple(sorted(changes.items()))
        if key in seen:
            continue
        seen.add(key)
        new = _apply(spec, changes)
        if new is None:
            continue
        peak = memory_report(new, assumptions).peak_bytes
        if peak > hbm:
            continue
        step = fast_step(new).step_time_s
        fits.append((n_moves, Alternative(changes, peak, step, mfu(new, step))))
    fits.sort(key=lambda f: (f[0], f[1].step_time_s))          # fewest moves, then fastest
    return FitAdvice(hbm, [a for _, a in fits[:MAX_SHOWN]], states_floor(spec))
