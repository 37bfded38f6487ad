"""`loom search`: every plan valid for the model, cluster and global batch, ranked.

Enumerated: dp·tp·pp·cp = world size over the divisors of the world size; sequence parallel (tp > 1); schedule
(1F1B; AFAB; interleaved with every vpp > 1 dividing layers/pp; pp = 1 has only "1f1b", the others being the
same thing); micro-batch sizes (powers of two up to 64) of at most 32K tokens (b·s; GEMM efficiency saturates
far below that, and 70B-class models run out of memory first); ZeRO 0-3 (only 0 when dp = cp = 1, where the
stages coincide);
recompute none/selective/op (per-op SAC; not with cp > 1)/full; mesh orders (outermost→innermost) ("pp","dp","cp","tp") (TP innermost, Megatron's
default), ("dp","pp","cp","tp") (Megatron's --use-tp-pp-dp-mapping), ("pp","dp","tp","cp") (CP innermost) and
("pp","cp","tp","dp") (DP innermost), deduplicated where they order the dimensions of degree > 1 the same way.
CP degrees whose zigzag chunk s/(2·cp) falls below 128 tokens (FlashAttention-2's tile) are rejected unpriced.
Not enumerated: parallel.tp_comm_overlap and overlap_param_gather (Megatron-LM's overlaps, docs/plan_ir.md). The
plan search returns must be one `loom run` can execute, and the executor does not implement them; to estimate a
Megatron-LM run with them, set them on the chosen plan and `loom simulate` it (or export it).

Order of work: structural validity (`loom.spec.validate.check`, memoized on the fields it reads), then memory
(`memory.stage_memory` on the first and last stage: the peak is always at one of them, since in-flight
micro-batches fall with the stage index and only those two hold the embedding and the head; checked against
`memory_report` in the tests), then the closed-form step time (`fast_cost.fast_step`) of every survivor. The
best few are then run through the event simulator (when `loom.simulator.simulate_time` exists) and re-ranked by
it. Every enumerated plan is counted once: evaluated, or rejected for its first reason.

All plans use the whole cluster, so ranking by step time, by tokens/s per GPU and by dollars per token give the
same order; `by` changes the column the table leads with and the sort key.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Callable

from loom.spec.errors import SpecError, SpecIssue, divisors
from loom.spec.mesh import Mesh
from loom.spec.spec import ParallelSpec, Spec
from loom.spec.validate import check

from .fast_cost import Breakdown, fast_step, mfu as mfu_of
from .memory import stage_memory

MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
MAX_MICROBATCH_TOKENS = 32768   # b·s per micro-batch: GEMMs are saturated long before (M = b·s/cp rows)
MIN_CP_CHUNK = 128              # zigzag CP chunk s/(2·cp) below FlashAttention's 128-row tile wastes the kernel
ZERO_STAGES = (0, 1, 2, 3)
RECOMPUTE = ("none", "selective", "op", "full")   # "op" (per-op SAC) is rejected by validation when cp > 1
MESHES = (("pp", "dp", "cp", "tp"), ("dp", "pp", "cp", "tp"), ("pp", "dp", "tp", "cp"), ("pp", "cp", "tp", "dp"))
EVENT_TOP = 3            # candidates re-ranked by the event simulator
BY = ("step_time", "tokens_per_gpu", "cost")

_FIELD_REASON = {
    "parallel.tp": "tp does not divide heads, kv_heads or ffn_hidden",
    "parallel.pp": "pp·vpp cannot split the layers",
    "model.seq_len": "seq_len not divisible by 2·cp",
    "parallel.sp": "sequence parallel: local sequence not divisible by tp",
    "training.global_batch": "global_batch not divisible (dp·micro_batch, or pp for interleaved)",
    "parallel.vpp": "vpp not valid for the schedule",
    "parallel.schedule": "schedule not valid for pp",
    "training.precision": "precision not supported by the GPU",
}
MEMORY_REASON = "memory: does not fit in HBM"
MESH_REASON = "mesh order equivalent to a priced one (same links)"
CP_REASON = f"cp: zigzag chunk below {MIN_CP_CHUNK} tokens"
OP_CP_REASON = "recompute op with cp > 1 (ring attention is not one savable op)"

_LOSS_LABELS = {"compute_s": "compute", "recompute_s": "memory (recompute)", "bubble_s": "pipeline bubble",
                "tp_exposed_s": "exposed TP comm", "cp_exposed_s": "exposed CP comm",
                "pp_exposed_s": "exposed PP comm", "dp_exposed_s": "exposed DP comm",
                "zero_exposed_s": "ZeRO gathers", "optimizer_s": "optimizer"}


@dataclass
class SearchRow:
    plan: ParallelSpec
    micro_batch: int
    recompute: str
    step_time_s: float                  # the fast path's (closed form)
    breakdown: Breakdown
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    peak_bytes: int
    headroom_bytes: int
    usd_per_million_tokens: float | None
    event_step_time_s: float | None = None    # the event simulator's, for the top candidates
    event_mfu: float | None = None
    loses_by: str | None = None               # why it is slower than the winner: the largest breakdown gap
    event_breakdown: dict | None = None       # the event simulator's components (same labels as LOSS_LABELS)

    @property
    def best_step_time_s(self) -> float:
        return self.event_step_time_s if self.event_step_time_s is not None else self.step_time_s

    def plan_dict(self) -> dict:
        d = self.plan.model_dump()
        d["mesh"] = list(d["mesh"])
        return {**d, "micro_batch": self.micro_batch, "recompute": self.recompute}

    def to_dict(self) -> dict:
        return {"plan": self.plan_dict(), "step_time_s": self.step_time_s,
                "event_step_time_s": self.event_step_time_s, "tokens_per_s": self.tokens_per_s,
                "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu, "mfu": self.mfu, "event_mfu": self.event_mfu,
                "peak_bytes": self.peak_bytes, "headroom_bytes": self.headroom_bytes,
                "usd_per_million_tokens": self.usd_per_million_tokens, "loses_by": self.loses_by,
                "breakdown": self.breakdown.to_dict(), "event_breakdown": self.event_breakdown}


@dataclass
class SearchResult:
    model: str
    world_size: int
    gpu: str
    global_batch: int
    by: str
    rows: list[SearchRow]
    enumerated: int                      # every plan considered
    evaluated: int                       # valid and fitting: priced by the fast path
    rejected: dict[str, int]             # reason -> plans
    event_simulated: int                 # candidates run through the event simulator (0: not available)
    seconds: dict[str, float] = field(default_factory=dict)   # wall time: enumerate+validate+memory+fast, event

    @property
    def best(self) -> SearchRow | None:
        return self.rows[0] if self.rows else None

    def rejection_summary(self) -> str:
        if not self.rejected:
            return "nothing rejected"
        return "; ".join(f"{n:,} {r}" for r, n in sorted(self.rejected.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict:
        return {"model": self.model, "world_size": self.world_size, "gpu": self.gpu,
                "global_batch": self.global_batch, "by": self.by, "enumerated": self.enumerated,
                "evaluated": self.evaluated, "rejected": dict(self.rejected), "event_simulated": self.event_simulated,
                "seconds": dict(self.seconds), "rows": [r.to_dict() for r in self.rows]}


# ---- enumeration ------------------------------------------------------------------------------------------
def _schedules(pp: int, layers: int) -> list[tuple[str, int]]:
    """(schedule, vpp) pairs for pp stages. When pp divides the layers: 1F1B, AFAB and interleaving with every
    vpp > 1 dividing layers/pp. Otherwise (e.g. 126 layers on 16 stages) the same with the uneven split
    (`parallel.uneven_split`: the Llama 3 layout) and vpp among the divisors of ⌈layers/pp⌉ that fit."""
    if pp == 1:
        return [("1f1b", 1)]
    out = [("1f1b", 1), ("afab", 1)]
    per = layers // pp if layers % pp == 0 else -(-layers // pp)
    out += [("interleaved", v) for v in divisors(per) if v > 1 and pp * v <= layers]
    return out


def _meshes(dp: int, tp: int, pp: int, cp: int, gpus_per_node: int) -> tuple[list[tuple[str, ...]], int]:
    """The mesh orders worth pricing, and how many more were dropped as equivalent: two orders are equivalent
    when every dimension's groups span the same number of nodes with the same members per node, the only thing
    the cost model (costs.CostModel._link) and the memory model read from the mesh."""
    deg = {"dp": dp, "tp": tp, "pp": pp, "cp": cp}
    seen, out, same = set(), [], 0
    for order in MESHES:
        mesh = Mesh(order, tuple(deg[d] for d in order), gpus_per_node)
        key = tuple((mesh.nodes_spanned(d), mesh.ranks_per_node(d)) for d in ("tp", "cp", "pp", "dp"))
        if key in seen:
            same += 1
            continue
        seen.add(key)
        out.append(order)
    return out, same


def _event_simulator():
    """loom.simulator.simulate_time when the event simulator is installed, else None."""
    try:
        from loom.simulator import simulate_time   # type: ignore[attr-defined]
    except ImportError:
        return None
    return simulate_time


def _peak(spec: Spec) -> int:
    """Peak bytes per GPU: in-flight micro-batches fall with the stage index, and only the first and last stage
    hold the embedding and the head, so the peak is on stage 0 or pp − 1; with an uneven split stage 1 (a full
    stage with the most in flight) is a candidate too. Checked against memory_report in the tests."""
    p = spec.plan
    stages = {0, p.pp - 1} | ({1} if p.uneven_split and p.pp > 2 else set())
    return max(stage_memory(spec, s).peak for s in stages)


def _key(row: "SearchRow") -> tuple:
    """Step time (the event simulator's where it ran), then more memory headroom. Every plan uses the whole
    cluster, so tokens/s per GPU and dollars per token order plans the same way."""
    return (row.best_step_time_s, -row.headroom_bytes)


def search(spec: Spec, by: str = "step_time", top_k: int = 10, progress: Callable[[int, int], None] | None = None,
           event_top: int = EVENT_TOP) -> SearchResult:
    """Rank every plan for `spec`'s model, cluster and training batch (its own `parallel` is ignored)."""
    if by not in BY:
        raise SpecError([SpecIssue("by", by, "unknown ranking.", f"use one of {list(BY)}.")])
    if top_k < 1:
        raise SpecError([SpecIssue("top_k", top_k, "must be at least 1.", "pass top_k ≥ 1.")])
    t0 = time.perf_counter()
    base_issues = [i for i in check(spec.model_copy(update={"parallel": "auto"}))]
    if base_issues:
        raise SpecError(base_issues)
    world, m = spec.world_size, spec.model
    gpu = spec.gpu
    price = gpu.price_per_gpu_hour
    tokens_per_step = spec.tokens_per_step
    divs = divisors(world)
    combos = [(tp, cp, pp) for tp in divs for cp in divs for pp in divs if world % (tp * cp * pp) == 0]
    rejected: dict[str, int] = {}
    enumerated = evaluated = 0
    keep = max(top_k, event_top)
    heap: list[tuple[float, int, SearchRow]] = []       # max-heap on step time (negated) of the best `keep`
    counter = 0
    valid_cache: dict[tuple, str | None] = {}
    training_cache: dict[tuple, object] = {}

    def reject(reason: str, n: int) -> None:
        nonlocal enumerated
        rejected[reason] = rejected.get(reason, 0) + n
        enumerated += n

    mbs = [b for b in MICRO_BATCHES if b * m.seq_len <= max(MAX_MICROBATCH_TOKENS, m.seq_len)]
    for done, (tp, cp, pp) in enumerate(combos, 1):
        dp = world // (tp * cp * pp)
        meshes, same = _meshes(dp, tp, pp, cp, spec.cluster.gpus_per_node)
        zeros = ZERO_STAGES if dp * cp > 1 else (0,)
        leaves_per_mb = len(zeros) * len(RECOMPUTE) * (len(meshes) + same)
        n_sp = 2 if tp > 1 else 1
        if cp > 1 and m.seq_len < 2 * cp * MIN_CP_CHUNK:
            reject(CP_REASON, n_sp * len(_schedules(pp, m.layers)) * len(mbs) * leaves_per_mb)
            if progress:
                progress(done, len(combos))
            continue
        for sp in ((False, True) if tp > 1 else (False,)):
            for schedule, vpp in _schedules(pp, m.layers):
                for mb in mbs:
                    vkey = (tp, cp, pp, sp, schedule, vpp, mb)
                    base = ParallelSpec(dp=dp, tp=tp, pp=pp, cp=cp, sp=sp, schedule=schedule, vpp=vpp,
                                        uneven_split=m.layers % (pp * vpp) != 0)
                    tkey = mb
                    training = training_cache.get(tkey)
                    if training is None:
                        training = training_cache[tkey] = spec.training.model_copy(update={"micro_batch": mb})
                    s0 = spec.model_copy(update={"parallel": base, "training": training})
                    reason = valid_cache.get(vkey, "?")
                    if reason == "?":
                        issues = check(s0)
                        reason = valid_cache[vkey] = (_FIELD_REASON.get(issues[0].field, issues[0].field)
                                                      if issues else None)
                    if reason:
                        reject(reason, leaves_per_mb)
                        continue
                    for zero in zeros:
                        for recompute in RECOMPUTE:
                            if recompute == "op" and cp > 1:     # spec/validate.py refuses it (ring attention)
                                reject(OP_CP_REASON, len(meshes) + same)
                                continue
                            tr = training_cache.get((mb, recompute))
                            if tr is None:
                                tr = training_cache[(mb, recompute)] = training.model_copy(
                                    update={"recompute": recompute})
                            plan = base.model_copy(update={"zero": zero})
                            s1 = spec.model_copy(update={"parallel": plan, "training": tr})
                            if same:
                                reject(MESH_REASON, same)
                            peak = _peak(s1)
                            if peak > gpu.hbm_bytes:
                                reject(MEMORY_REASON, len(meshes))
                                continue
                            for mesh in meshes:
                                sm = s1 if mesh == plan.mesh else spec.model_copy(
                                    update={"parallel": plan.model_copy(update={"mesh": mesh}), "training": tr})
                                bd = fast_step(sm)
                                enumerated += 1
                                evaluated += 1
                                st = bd.step_time_s
                                if len(heap) >= keep and -heap[0][0] <= st:
                                    continue
                                tps = tokens_per_step / st
                                row = SearchRow(plan=sm.plan, micro_batch=mb, recompute=recompute, step_time_s=st,
                                                breakdown=bd, tokens_per_s=tps, tokens_per_s_per_gpu=tps / world,
                                                mfu=mfu_of(sm, st), peak_bytes=peak,
                                                headroom_bytes=gpu.hbm_bytes - peak,
                                                usd_per_million_tokens=(st * world * price / 3600 / tokens_per_step
                                                                        * 1e6) if price else None)
                                counter += 1
                                item = (-st, -counter, row)
                                if len(heap) < keep:
                                    heapq.heappush(heap, item)
                                else:
                                    heapq.heapreplace(heap, item)
        if progress:
            progress(done, len(combos))
    t_fast = time.perf_counter() - t0

    rows = sorted((r for _, _, r in heap), key=lambda r: (r.step_time_s, -r.headroom_bytes))
    sim = _event_simulator()
    n_event = 0
    t1 = time.perf_counter()
    if sim is not None and rows and event_top > 0:
        for r in rows[:event_top]:
            s = _spec_of(spec, r)
            rep = sim(s)
            r.event_step_time_s = rep.step_time_s
            r.event_mfu = mfu_of(s, rep.step_time_s)
            n_event += 1
            r.event_breakdown = _event_components(rep)
        rows = sorted(rows[:n_event], key=_key) + rows[n_event:]
    rows = rows[:top_k]
    _explain_losers(rows)
    return SearchResult(model=m.name, world_size=world, gpu=gpu.name, global_batch=spec.training.global_batch,
                        by=by, rows=rows, enumerated=enumerated, evaluated=evaluated, rejected=rejected,
                        event_simulated=n_event,
                        seconds={"fast": t_fast, "event": time.perf_counter() - t1})


def _spec_of(spec: Spec, row: SearchRow) -> Spec:
    training = spec.training.model_copy(update={"micro_batch": row.micro_batch, "recompute": row.recompute})
    return spec.model_copy(update={"parallel": row.plan, "training": training})


def _fast_components(b: Breakdown) -> dict[str, float]:
    return {label: getattr(b, k) for k, label in _LOSS_LABELS.items()}


def _event_components(rep) -> dict[str, float]:
    """The same causes from a TimeReport: compute and recompute on the critical rank class, the bubble as its
    fraction of the step, exposed communication per mesh dim (ZeRO gathers run on the DP group)."""
    k, x = rep.compute_s_by_kind, rep.exposed_comm_s
    return {"compute": k.get("forward", 0.0) + k.get("backward", 0.0), "memory (recompute)": k.get("recompute", 0.0),
            "pipeline bubble": rep.bubble_fraction * rep.step_time_s, "exposed TP comm": x.get("tp", 0.0),
            "exposed CP comm": x.get("cp", 0.0), "exposed DP comm": x.get("dp", 0.0),
            "exposed PP comm": x.get("pp", 0.0), "optimizer": k.get("optimizer", 0.0)}


def _explain_losers(rows: list[SearchRow]) -> None:
    """Each row after the first: the cause where it loses most time to the winner, from the event simulator's
    breakdowns when both ran through it, else from the fast path's."""
    if not rows:
        return
    win = rows[0]
    for r in rows[1:]:
        if r.event_breakdown and win.event_breakdown:
            mine, theirs = r.event_breakdown, win.event_breakdown
        else:
            mine, theirs = _fast_components(r.breakdown), _fast_components(win.breakdown)
        gaps = {k: mine[k] - theirs.get(k, 0.0) for k in mine}
        k = max(gaps, key=gaps.get)
        # below a microsecond per step the difference is rounding, not a cause
        r.loses_by = f"{k} +{gaps[k]:.3g} s" if gaps[k] > 1e-6 else "tie"


def resolve_auto(spec: Spec, by: str = "step_time") -> tuple[Spec, SearchResult]:
    """`parallel = "auto"`: the spec with the best plan (and its micro-batch size and recompute) filled in."""
    result = search(spec, by=by, top_k=max(EVENT_TOP, 1))
    if not result.rows:
        raise SpecError([SpecIssue("parallel", "auto", f"no plan fits {spec.model.name} on {spec.world_size} × "
                                   f"{spec.gpu.name} with global_batch {spec.training.global_batch}: "
                                   f"{result.rejection_summary()}.",
                                   "use more GPUs or GPUs with more memory, a smaller model, or a global batch "
                                   "with more divisors.")])
    best = _spec_of(spec, result.rows[0])
    issues = check(best)
    assert not issues, issues        # search only returns valid plans
    return best, result


# ---- text ------------------------------------------------------------------------------------------------
def format_search(result: SearchResult) -> str:
    from tabulate import tabulate
    GiB = 2**30
    head = (f"{result.model} on {result.world_size} × {result.gpu}, global batch {result.global_batch}: "
            f"{result.enumerated:,} plans, {result.evaluated:,} valid and fitting "
            f"({result.seconds.get('fast', 0):.2f} s"
            + (f", event simulation of the top {result.event_simulated}: {result.seconds.get('event', 0):.2f} s)"
               if result.event_simulated else ", event simulator not available)"))
    rows = []
    for i, r in enumerate(result.rows, 1):
        p = r.plan
        rows.append([i, p.dp, p.tp, p.pp, p.cp, "y" if p.sp else "", p.zero,
                     p.schedule + (f"×{p.vpp}" if p.vpp > 1 else ""), r.micro_batch, r.recompute,
                     ",".join(d for d in p.mesh), f"{r.step_time_s:.3f}",
                     f"{r.event_step_time_s:.3f}" if r.event_step_time_s is not None else "",
                     f"{r.tokens_per_s_per_gpu:,.0f}", f"{(r.event_mfu or r.mfu):.1%}",
                     f"{r.headroom_bytes / GiB:.1f}",
                     f"{r.usd_per_million_tokens:.3f}" if r.usd_per_million_tokens is not None else "",
                     r.loses_by or ("best" if i == 1 else "")])
    table = tabulate(rows, headers=["#", "dp", "tp", "pp", "cp", "sp", "zero", "schedule", "mb", "recompute",
                                    "mesh", "step s (fast)", "step s (event)", "tok/s/GPU", "MFU",
                                    "headroom GiB", "$/M tok", "loses by"])
    rej = "\n".join(f"  {n:>10,}  {r}" for r, n in sorted(result.rejected.items(), key=lambda kv: -kv[1]))
    return f"{head}\n{table}\nrejected:\n{rej or '  none'}"
