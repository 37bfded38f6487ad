"""Closed-form step time of a plan: the fast path `search` ranks every candidate with.

It prices the ops `loom.spec.compile.compile_plan` would emit for one micro-batch of one chunk (forward,
recompute, backward with their FLOPs and HBM bytes from `compile._Shapes`; their TP/SP collectives, CP K/V
exchanges, the PP send, the DP buckets, ZeRO gathers and the optimizer) with the event simulator's own cost
model (`costs.CostModel.duration`, `hardware.HardwareProfile`). compile_plan puts the CP exchanges, ZeRO-3
gathers and DP buckets on one in-order comm stream per rank, so their order decides what compute waits for; the
fast path follows that stream with the event simulator's edge rules (engine.run) applied to a handful of ops per
forward/backward (`_forward`, `_backward`):

- pp = 1: the stage's two streams forward by forward, backward by backward over the step (`_single_stage`: three
  units exact, the rest at the last one's increments), then the optimizer and the ZeRO-1/2 parameter gather.
- pp > 1: the pipeline formula (Narayanan et al. 2021 §2.2; bubble (pp − 1)/(v·m) of the steady state)

    T_pipe = pp·(t_fill + 2·t_p2p) + (m·v − 1)·(t_unit + 2·t_p2p) + (m − 1)·t_head' + t_head
    step   = T_pipe + exposed DP (stage 0's buckets after its last backward) + optimizer + ZeRO-1/2 gather

  with t_unit the steady-state time per unit (one micro-batch through one chunk) of stage 0's streams, the
  eigenvalue of their max-plus recurrence (`_period`), averaged over its chunks' buckets; t_fill the same
  without queued buckets and with inputs arriving just in time (fill, drain and the last unit); t_p2p one
  activation send (each unit receives one activation and one gradient: on the critical path in the event
  simulation too); t_head the LM head's work, t_head' what the last stage's unit with the head takes beyond
  t_unit (less where the comm stream paces both).

Agreement with `simulate_time` is checked in tests/test_search.py (within 5 % on the winners of a sample),
tests/test_fast_cost_families.py (per comm-stream family) and measured in benchmarks/search_speed.py.

The modules: this one holds `Breakdown`, the plan-level closed form `fast_step` and `mfu`; `fast_unit` what one
unit (one micro-batch through one chunk) costs, and the memo tables `_CTX` shared by the plans of a search;
`fast_streams` the per-stage stream recurrences (`_forward`, `_backward`, `_single_stage`, `_period`). The names
tests and benchmarks reach for (`_CTX`, `_unit`, `_forward`, `_backward`, `_period`, `_NEG`, ...) stay
importable from here; tests monkeypatch `fast_cost._unit`, which `fast_step` looks up in this module.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from loom.spec.compile import OPT_STATE_BYTES, _ring, _Shapes
from loom.spec.mesh import Mesh
from loom.spec.plan import OpKind

from .costs import CostModel
from .fast_streams import (_NEG, _backward, _buckets_end, _forward, _period, _repeat,  # noqa: F401 (re-exported)
                           _single_stage, _Unit)
from .fast_unit import _CTX, _MAX, _Ctx, _durations, _memo, _op, _unit, _units, _work  # noqa: F401 (re-exported)
from .hardware import HardwareProfile


@dataclass(frozen=True)
class Breakdown:
    """Seconds per optimizer step by cause, on the rank class that finishes last."""
    compute_s: float          # m·v chunk forwards + backwards (matmuls, attention, memory-bound work) and the head
    recompute_s: float        # recomputed forward work
    bubble_s: float           # pipeline fill and drain: (pp − 1) unit-times with their sends
    tp_exposed_s: float       # TP/SP collectives (on the compute stream: never overlapped)
    cp_exposed_s: float       # ring-attention K/V exchange not hidden behind attention
    pp_exposed_s: float       # activation / gradient sends between stages on the steady-state path
    dp_exposed_s: float       # gradient buckets still reducing after the last backward
    zero_exposed_s: float     # ZeRO-3 gathers not hidden by prefetch; ZeRO-1/2 post-step parameter gather
    optimizer_s: float
    step_time_s: float

    def to_dict(self) -> dict:
        return asdict(self)



def fast_step(spec, profile: HardwareProfile | dict | None = None) -> Breakdown:
    """Closed-form step time of a validated spec with a concrete plan (see the module docstring)."""
    p, t, md = spec.plan, spec.training, spec.model
    ctx = _CTX
    gpu_key = (spec.cluster.gpu, spec.cluster.custom_gpu, spec.cluster.intra_node_GBps,
               spec.cluster.inter_node_GBps, spec.cluster.intra_node_latency_s, spec.cluster.inter_node_latency_s)
    hw = HardwareProfile.resolve(spec.gpu, profile) if profile is not None else \
        _memo(ctx.hw, gpu_key, lambda: HardwareProfile.resolve(spec.gpu, None))
    sh = _memo(ctx.shapes, (id(md), p.tp, p.cp, p.dp, p.sp, t.micro_batch, t.precision, t.grad_dtype),
               lambda: _Shapes(spec))
    order, sizes = tuple(p.mesh), tuple(p.degree(d) for d in p.mesh)
    mesh = _memo(ctx.meshes, (order, sizes, spec.cluster.gpus_per_node),
                 lambda: Mesh(order, sizes, spec.cluster.gpus_per_node))
    cost = _memo(ctx.costs, (id(md), id(hw), order, sizes, spec.cluster.gpus_per_node, t.micro_batch, t.precision),
                 lambda: CostModel(spec, hw, mesh)) if profile is None else CostModel(spec, hw, mesh)
    ctx.shapes[("keep", id(md))] = md          # keep the model alive while its id keys the memo tables
    dur = _durations(cost)
    v = p.vpp if p.schedule == "interleaved" else 1
    pp, m = p.pp, spec.micro_batches
    # layers per chunk: all equal, or with parallel.uneven_split the compiler's split (first and last lighter);
    # the steady state runs at the pace of the fullest chunk
    n = -(-md.layers // (pp * v))
    u = _unit(spec, sh, cost, n, pp, v)
    t_f, t_b, t_r, t_head, tp_f, tp_b, tp_r = u.t_f, u.t_b, u.t_r, u.t_head, u.tp_f, u.tp_b, u.tp_r
    x_f, x_b, g_unit, zero3_once = u.x_f, u.x_b, u.g_unit, u.zero3_once
    first, rest, per_mb, d_unit, p2p = u.first, u.rest, u.per_mb, u.d_unit, u.p2p
    gb, pb = sh.gb, sh.pb

    # Per unit, forward part and backward part on each stream (for the breakdown and the pipeline's lead)
    c_f = t_f + tp_f
    c_b = t_r + t_b + tp_r + tp_b
    c_unit = c_f + c_b
    x_unit = x_f + x_b
    k_unit = x_unit + g_unit + (d_unit if per_mb else 0.0)
    blocking = x_unit > 0 or g_unit > 0
    afab = p.schedule == "afab"
    comm_end = 0.0
    if pp == 1:
        # one stage: its two streams action by action over the whole step (_single_stage)
        t_pipe, k_end = _single_stage(u, afab, m)
        head = m * t_head
        unit = (t_pipe - head) / m
        dp_exposed = max(0.0, k_end - t_pipe)
        fill = unit
    else:
        # ---- pipeline. unit: the steady-state time per unit of stage 0's streams (_period; with tied embeddings
        # and ZeRO-2 a middle stage's buckets); the fill and drain pass every stage once at the pace of a unit
        # without queued buckets whose inputs arrive just in time (jit), as does the last unit (no later unit waits
        # for its buckets: they are the tail below).
        # The last stage adds the LM head: per micro-batch what its unit with the head (and its own buckets) takes
        # beyond the unit, where the comm stream paces both part of the head hides (less one chunk's missing layers
        # under an uneven split); the last micro-batch's head in full.
        if blocking:
            u0 = _period(u, afab, u.b_first)
            base = u0
            if v > 1 or (pp > 2 and u.b_mid != u.b_first):
                umid = _period(u, afab, u.b_mid) if u.b_mid != u.b_first else u0
                base = max(u0, umid) if pp > 2 else u0
            else:
                umid = u0
            unit = ((v - 1) * umid + base) / v
            fill = _period(u, afab, None, jit=True)
            extra = _period(u, afab, u.b_end, t_head) - base if t_head else 0.0
        else:
            unit = fill = c_unit
            extra = t_head
        light = u.last_light * unit
        head = (m - 1) * max(0.0, extra - light) + max(0.0, t_head - light)
        t_pipe = pp * (fill + 2 * p2p) + (m * v - 1) * (unit + 2 * p2p) + head + zero3_once
        lead = (m * v * c_f if afab else c_f) + (pp - 1) * (fill + 2 * p2p)
        # ZeRO-2 under PP: stage 0's buckets (and its backwards' K/V blocks, same stream) run from its first
        # backward on (after the fill and, with afab, all forwards); the stream's end bounds the step (tail included)
        comm_end = lead + m * v * (d_unit + x_b) if per_mb else 0.0
        # ---- the tail on stage 0 (the last to finish its backward)
        dp_exposed = first[1]
        if v > 1 and not per_mb:   # the other chunks' buckets, issued during the drain
            dp_exposed += (v - 1) * rest[1] if blocking else max(0.0, (v - 1) * rest[0] - (v - 1) * unit)

    # ---- optimizer and the distributed optimizer's parameter gather ----------------------------------------
    # the busiest stage's parameters: v chunks plus the embedding (stage 0) or the head (last stage)
    stage_params = v * u.chunk_params + (u.root_params if pp == 1 else max(u.emb_params, u.head_params))
    dpcp = p.dp * p.cp
    shard = dpcp if p.zero >= 1 else 1
    t_opt = dur(OpKind.OPTIMIZER, mem_bytes=stage_params / shard * (OPT_STATE_BYTES[t.optimizer] + gb))
    zero12 = 0.0
    if p.zero in (1, 2) and dpcp > 1 and not p.overlap_param_gather:
        # compile_dp._optimizer: one call per padded unit of every chunk of the stage (stage 0 here)
        u0 = _units(sh, p, n, True, pp == 1 and v == 1)
        um = _units(sh, p, n, False, False) if v > 1 else ()
        k = len(u0) + (v - 1) * len(um)
        msg = (sum(u0) + (v - 1) * sum(um)) * pb / k
        zero12 = dur(OpKind.ZERO_ALLGATHER, group="dp", group_size=dpcp, count=k, msg_bytes=msg,
                     wire_bytes=_ring(OpKind.ZERO_ALLGATHER, dpcp, msg) * k)
    elif p.zero in (1, 2) and dpcp > 1:
        # overlap_param_gather (compile_plan): each chunk's units gathered before its first forward. Without
        # interleaving bucket by bucket from when the forward could start (first unit exposed, the forward no
        # faster than the gather): each stage's first forward grows by e, and the pipeline fill passes all pp
        # stages. Interleaved: every chunk's gather from the step's start, whole (Megatron's align_param_gather):
        # stage 0 waits for chunk 0's, and chunk c's is late if c gathers outlast c·pp forwards.
        g_units = _units(sh, p, n, True, pp == 1 and v == 1)   # stage 0's first chunk, as compile_plan
        k, msg = len(g_units), sum(g_units) * pb / len(g_units)
        g_c = dur(OpKind.ZERO_ALLGATHER, group="dp", group_size=dpcp, count=k, msg_bytes=msg,
                  wire_bytes=_ring(OpKind.ZERO_ALLGATHER, dpcp, msg) * k)
        if v == 1:
            fwd = t_f + (t_head / 3 if pp == 1 else 0.0)
            zero12 = pp * max(g_c / k, g_c + fwd / k - fwd)
        else:
            zero12 = g_c + (v - 1) * max(0.0, g_c - pp * c_f)

    if comm_end > t_pipe + dp_exposed:
        dp_exposed = comm_end - t_pipe
    step = t_pipe + dp_exposed + t_opt + zero12
    stall = m * v * max(0.0, unit - c_unit)            # the comm stream holding compute back
    share = x_unit / k_unit if blocking else 0.0
    return Breakdown(compute_s=m * v * (t_f + t_b) + m * t_head, recompute_s=m * v * t_r,
                     bubble_s=(pp - 1) * (fill + 2 * p2p), pp_exposed_s=m * v * 2 * p2p,
                     tp_exposed_s=m * v * (tp_f + tp_b + tp_r), cp_exposed_s=stall * share,
                     dp_exposed_s=dp_exposed,
                     zero_exposed_s=stall * (1 - share) + zero12 + zero3_once, optimizer_s=t_opt,
                     step_time_s=step)


def mfu(spec, step_time_s: float) -> float:
    """Model FLOPs utilization in the PaLM convention (ModelSpec.model_flops_per_token), as simulate_time."""
    return spec.model.model_flops_per_token() * spec.tokens_per_step / (
        step_time_s * spec.world_size * spec.gpu.peak_flops[spec.training.precision])
