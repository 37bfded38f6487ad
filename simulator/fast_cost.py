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
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from loom.spec.compile import MAX_BUCKET_OPS, OPT_STATE_BYTES, _ring, _Shapes, split_layers
from loom.spec.mesh import Mesh
from loom.spec.units import chunk_units
from loom.spec.plan import Op, OpKind

from .costs import CostModel, exposed_overlap
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


class _Ctx:
    """What does not change between the plans of one search: memoized shapes, meshes and cost models."""

    def __init__(self) -> None:
        self.shapes: dict[tuple, _Shapes] = {}
        self.meshes: dict[tuple, Mesh] = {}
        self.costs: dict[tuple, CostModel] = {}
        self.hw: dict[tuple, HardwareProfile] = {}
        self.durations: dict[tuple, float] = {}


_CTX = _Ctx()
_MAX = 100_000


def _memo(table: dict, key: tuple, make):
    hit = table.get(key)
    if hit is None:
        if len(table) > _MAX:          # clear every table together: their keys hold ids of each other's values
            for t in (_CTX.shapes, _CTX.meshes, _CTX.costs, _CTX.hw, _CTX.durations):
                t.clear()
        hit = table[key] = make()
    return hit


def _op(kind: OpKind, **kw) -> Op:
    stream = "compute" if kind.is_compute or kind.dim == "tp" else ("p2p" if kind.dim == "pp" else "comm")
    return Op(id=0, kind=kind, stage=0, rank_class="", order=0, stream=stream, **kw)


class _Unit:
    """Durations of one micro-batch through one chunk, and what the plan's tail needs."""
    __slots__ = ("t_f", "t_b", "t_r", "t_head", "tp_f", "tp_b", "tp_r", "x_f", "x_b", "g_unit", "zero3_once",
                 "first", "rest", "per_mb", "d_unit", "chunk_params", "emb_params",
                 "head_params", "root_params", "p2p", "last_light", "has_r", "x_r", "x_1", "x_2", "k",
                 "t_root", "t_gl", "n", "b_first", "b_mid", "b_end")


def _durations(cost: CostModel):
    """cost.duration on an op described by keywords, memoized: compute ops on the cost model's efficiencies and
    op sizes, collectives on the link (bandwidths, latency) of their group and their sizes."""
    sig = getattr(cost, "_loom_sig", None)
    if sig is None:
        sig = cost._loom_sig = (cost.peak_gemm, cost.e_gemm, cost.peak_attn, cost.e_attn, cost.hbm,
                                cost.hw.elementwise_traffic, cost.hw.compute_overhead_s)
    links = cost._links
    table = _CTX.durations

    def dur(kind: OpKind, **kw) -> float:
        group = kw.get("group")
        key = (kind, sig if group is None else links[group], tuple(kw.items()))
        hit = table.get(key)
        if hit is None:
            if len(table) > _MAX:
                table.clear()
            hit = table[key] = cost.duration(_op(kind, **kw))
        return hit
    return dur


def _units(sh: _Shapes, p, layers: int, first: bool, last: bool) -> tuple[int, ...]:
    """Elements of each DP unit of a chunk of `layers` layers (spec/units.py chunk_units, as _Shapes.dp_units),
    memoized on what they depend on: the memoized _Shapes is shared by plans of other ZeRO stages and bucket
    sizes, so its own dp_units cache (built for its first spec) cannot be used here."""
    key = ("units", id(sh.model), sh.tp, p.sp, p.zero, p.bucket_MB, sh.gb, sh.dpcp, layers, first, last)
    hit = _CTX.durations.get(key)
    if hit is None:
        hit = _CTX.durations[key] = tuple(x.numel for x in chunk_units(
            sh.model, sh.tp, p.sp, p.zero, p.bucket_MB, sh.gb, sh.dpcp, range(layers), first, last))
    return hit


def _buckets_end(kf: float, s: float, t_b: float, t_all: float, t_last: float, j: int) -> float:
    """End of j bucket ops on an in-order stream free at kf, op i released when (i+1)/j of a backward started at s
    and lasting t_b is done (compile_dp._buckets' edges): the first j-1 take (t_all - t_last)/(j-1) each, the
    last t_last. The queue's end is the latest of (release of op i + all ops from i on); with equal ops before
    the last, that is op 0, op j-2 or op j-1."""
    if j == 1:
        return max(kf, s + t_b) + t_all
    d = (t_all - t_last) / (j - 1)
    return max(kf + t_all, s + t_b / j + t_all, s + t_b * (j - 1) / j + d + t_last, s + t_b + t_last)


def _work(p, t, sh: _Shapes, cost: CostModel, dur, n: int) -> tuple[float, ...]:
    """(t_f, t_b, t_r, t_head, tp_f, tp_b, tp_r): one micro-batch's compute through a chunk of n layers and its TP
    collectives (compute stream), memoized: plans of a search share them across dp, pp, schedules and meshes."""
    key = ("work", cost._loom_sig, cost._links["tp"], id(sh), n, t.recompute, p.sp, p.tp_comm_overlap)
    hit = _CTX.durations.get(key)
    if hit is not None:
        return hit
    lay = range(n)
    toks = sh.tokens / sh.shard
    mem_toks = sh.tokens / sh.cp

    # ---- one chunk, one micro-batch --------------------------------------------------------------------
    f = toks * n * (sh.layer_f + sh.attn_f)
    fa = toks * n * sh.attn_f
    fm = mem_toks * n * sh.layer_mem
    t_f = dur(OpKind.FORWARD, flops=f, attn_flops=fa, mem_bytes=fm, layers=lay)
    t_b = dur(OpKind.BACKWARD, flops=2 * f, attn_flops=2 * fa, mem_bytes=2 * fm, layers=lay)
    if t.recompute == "full":
        t_r = dur(OpKind.RECOMPUTE, flops=f, attn_flops=fa, mem_bytes=fm, layers=lay)
    elif t.recompute == "op":          # per-op: the unsaved matmuls and the memory-bound work (compile_plan)
        t_r = dur(OpKind.RECOMPUTE, flops=toks * n * sh.op_f, attn_flops=0.0, mem_bytes=fm, layers=lay)
    elif t.recompute == "selective":
        t_r = dur(OpKind.RECOMPUTE, flops=fa, attn_flops=fa, layers=lay)
    else:
        t_r = 0.0
    # LM head on the last virtual stage: extra forward work (backward 2×), no layers of its own
    f_h, fm_h = toks * sh.head_f, mem_toks * sh.head_mem
    t_head = 3 * dur(OpKind.FORWARD, flops=f_h, mem_bytes=fm_h) if f_h else 0.0

    # TP: per pass 2n all-reduces, or 2n all-gathers + 2n reduce-scatters with SP (compile_plan; its few extra
    # calls around the embedding, the head and the cross-entropy are left out here)
    t_tp_pass = 0.0
    if p.tp > 1:
        kinds = (OpKind.SP_ALLGATHER, OpKind.SP_REDUCESCATTER) if p.sp else (OpKind.TP_ALLREDUCE,)
        for k in kinds:
            t_tp_pass += dur(k, group="tp", group_size=p.tp, count=2 * n, msg_bytes=sh.act_msg,
                                 wire_bytes=_ring(k, p.tp, sh.act_msg) * 2 * n)
    # full recompute reruns a layer up to torch checkpoint's early stop: 1 of 2 all-reduces (SP: 3 of 4 calls)
    tp_f = tp_b = t_tp_pass
    if p.tp > 1 and p.sp:   # the backward re-gathers the QKV and FC1 input shards (Korthikanti §4.2.2; compile_plan)
        tp_b += dur(OpKind.SP_ALLGATHER, group="tp", group_size=p.tp, count=2 * n, msg_bytes=sh.act_msg,
                    wire_bytes=_ring(OpKind.SP_ALLGATHER, p.tp, sh.act_msg) * 2 * n)
    tp_r = ((0.75 if p.sp else 0.5) if t.recompute in ("full", "op") else 0) * t_tp_pass
    if p.tp_comm_overlap and p.tp > 1:
        # compile_plan's tp_overlap_ops: one collective per GEMM partner, charged its exposed part
        # (costs.exposed_overlap): forward AG ring with QKV/FC1, RS pipelined (4) with proj/FC2; backward AG ring
        # with the proj/FC2 dgrad, AG (input re-gather) bulk beside the QKV/FC1 dgrad, RS bulk beside the QKV/FC1
        # wgrad; full recompute the forward's QKV, FC1, proj
        AG, RS = OpKind.SP_ALLGATHER, OpKind.SP_REDUCESCATTER

        def ov(k: OpKind, method: str, gemm: str, splits: int) -> float:
            c = dur(k, group="tp", group_size=p.tp, count=n, msg_bytes=sh.act_msg,
                    wire_bytes=_ring(k, p.tp, sh.act_msg) * n)
            return exposed_overlap(method, c, cost.gemm_time(toks * n * sh.gemm_f[gemm]), splits)
        tp_f = ov(AG, "ring", "qkv", p.tp) + ov(AG, "ring", "fc1", p.tp) + ov(RS, "pipeline", "proj", 4) \
            + ov(RS, "pipeline", "fc2", 4)
        tp_b = ov(AG, "ring", "proj", p.tp) + ov(AG, "ring", "fc2", p.tp) + ov(AG, "bulk", "qkv", 1) \
            + ov(AG, "bulk", "fc1", 1) + ov(RS, "bulk", "qkv", 1) + ov(RS, "bulk", "fc1", 1)
        if t.recompute == "full":
            tp_r = ov(AG, "ring", "qkv", p.tp) + ov(AG, "ring", "fc1", p.tp) + ov(RS, "pipeline", "proj", 4)

    hit = _CTX.durations[key] = (t_f, t_b, t_r, t_head, tp_f, tp_b, tp_r)
    return hit


def _unit(spec, sh: _Shapes, cost: CostModel, n: int, pp: int, v: int) -> _Unit:
    p, t = spec.plan, spec.training
    dur = _durations(cost)
    lay = range(n)
    t_f, t_b, t_r, t_head, tp_f, tp_b, tp_r = _work(p, t, sh, cost, dur, n)

    # ---- the comm stream: CP exchanges, ZeRO-3 gathers, DP buckets -----------------------------------------
    # compile_plan puts all three on one in-order "comm" stream; their durations here, their order and what
    # compute waits for in _forward/_backward below.
    gb, pb = sh.gb, sh.pb
    chunk_params = sh.chunk_params(lay, False, False)
    x_f = x_b = g_unit = x_r = x_1 = x_2 = 0.0
    steps = max(1, n * (p.cp - 1))
    has_r = t.recompute != "none" and n > 0
    if p.cp > 1 and n:
        steps = n * (p.cp - 1)
        one = lambda count, msg=sh.kv_msg: dur(OpKind.CP_KV_EXCHANGE, group="cp",  # noqa: E731
                                               group_size=p.cp, count=count, msg_bytes=msg, wire_bytes=msg * count)
        # n·(cp − 1) K/V blocks per forward and recompute; the backward sends them again plus as many dK/dV (fp32)
        x_f = x_1 = one(steps)
        x_r = x_f if has_r else 0.0
        x_2 = one(steps, sh.dkv_msg)
        x_b = x_r + x_1 + x_2
    zero3_once = t_root = t_gl = 0.0
    dpcp = p.dp * p.cp                      # the gradient reduction / ZeRO group (compile_plan)
    if p.zero == 3 and dpcp > 1:
        # compile_dp.zero3_gathers: the root unit (embedding, final norm, head; stage 0's: the embedding) and one
        # call per layer, each unit padded to dp·cp. Without PP before every forward (root and layers) and again
        # before every backward (layers); under PP once per chunk, at its first forward (zero3_once: stage 0's
        # first chunk, whose gather cannot be prefetched)
        G = OpKind.ZERO_ALLGATHER
        root = sum(_units(sh, p, 0, True, pp == 1)) * pb
        t_root = dur(G, group="dp", group_size=dpcp, count=1, msg_bytes=root, wire_bytes=_ring(G, dpcp, root))
        if n:
            per = _units(sh, p, 1, False, False)[0] * pb
            t_gl = dur(G, group="dp", group_size=dpcp, count=n, msg_bytes=per, wire_bytes=_ring(G, dpcp, per) * n)
        if pp == 1:
            g_unit = t_root + 2 * t_gl
        else:
            # interleaved: each later chunk's layers at its first forward, prefetched one op ahead only (beside
            # one forward: what the gather takes beyond it shows, once per chunk)
            zero3_once = t_root + t_gl + (v - 1) * max(0.0, t_gl - t_f - tp_f)
            t_root = t_gl = 0.0

    # DP: each chunk's buckets follow its last backward (ZeRO 0/1, ZeRO-3 under PP), or every backward (ZeRO-2,
    # ZeRO-3 without PP keep a gradient shard only, so each micro-batch's gradients are reduce-scattered); bucket
    # op k of n_ops may start once (k+1)/n_ops of the backward is done, while the backward's own TP collectives
    # follow it on compute.
    kind = OpKind.DP_ALLREDUCE if p.zero == 0 else OpKind.DP_REDUCESCATTER

    def issue(layers: int, first: bool, last: bool) -> tuple[float, float, int, float]:
        """(comm time, part of it left after the producing backward and its TP collectives, bucket ops, the last
        op's time) of one chunk's buckets: the executor's units, each padded to dp·cp, grouped as
        compile_dp._buckets groups them (the last op holds the embedding or the root unit, often the largest;
        the others are taken as equal)."""
        if dpcp <= 1:
            return 0.0, 0.0, 1, 0.0
        key = ("buckets", id(sh.model), sh.tp, p.sp, p.zero, p.bucket_MB, sh.gb, dpcp, cost._links["dp"], kind,
               layers, first, last)
        hit = _CTX.durations.get(key)
        if hit is None:
            units = _units(sh, p, layers, first, last)
            n_buckets = len(units)
            n_ops = min(n_buckets, MAX_BUCKET_OPS)
            total = sum(units) * gb
            t_all = dur(kind, group="dp", group_size=dpcp, count=n_buckets, msg_bytes=total / n_buckets,
                        wire_bytes=_ring(kind, dpcp, total / n_buckets) * n_buckets)
            c = n_buckets // n_ops                    # compile_dp._buckets: the last op's count
            tail = sum(units[n_buckets - c:]) * gb / c
            t_last = dur(kind, group="dp", group_size=dpcp, count=c, msg_bytes=tail,
                         wire_bytes=_ring(kind, dpcp, tail) * c) if n_ops > 1 else t_all
            hit = _CTX.durations[key] = (t_all, n_ops, t_last)
        t_all, n_ops, t_last = hit
        end = _buckets_end(0.0, 0.0, t_b, t_all, t_last, n_ops)
        return t_all, max(0.0, end - t_b - tp_b), n_ops, t_last

    counts = [len(r) for r in split_layers(spec.model.layers, pp * v)] if p.uneven_split else [n]
    first = issue(counts[0], True, pp == 1 and v == 1)      # stage 0, chunk 0: + embedding
    rest = issue(n, False, False) if v > 1 else (0.0, 0.0, 1, 0.0)
    # compile_plan's per_micro_batch_reduction: ZeRO-2 always, ZeRO-3 without PP; under PP with tied embeddings
    # the chunks holding the table (first and last virtual stage) reduce once per step, after their last
    # backward (the tail below). The buckets one unit issues, (t_all, t_last, n_ops) or None, per kind of chunk:
    # stage 0's first (+ embedding: its largest unit closes the queue), a middle one, the last stage's last
    # (+ head: its largest unit opens the queue).
    per_mb = p.zero == 2 or (p.zero == 3 and pp == 1)
    b_first = b_mid = b_end = None
    if per_mb and dpcp > 1:
        b_first = (first[0], first[3], first[2])
        if pp > 1:
            mid = rest if v > 1 else issue(n, False, False)
            end = issue(counts[-1], False, True)
            b_mid, b_end = (mid[0], mid[3], mid[2]), (end[0], end[3], end[2])
            if spec.model.tied_embeddings:
                b_first = b_end = None
    d_unit = ((b_first[0] if b_first else 0.0) + (v - 1) * (b_mid[0] if b_mid else 0.0)) / v
    if pp > 2 and b_mid:                      # a middle stage's: all its chunks reduce every micro-batch
        d_unit = max(d_unit, b_mid[0])

    u = _Unit()
    u.t_f, u.t_b, u.t_r, u.t_head, u.tp_f, u.tp_b, u.tp_r = t_f, t_b, t_r, t_head, tp_f, tp_b, tp_r
    u.x_f, u.x_b, u.g_unit, u.zero3_once = x_f, x_b, g_unit, zero3_once
    u.first, u.rest, u.per_mb, u.d_unit = first, rest, per_mb, d_unit
    u.has_r, u.x_r, u.x_1, u.x_2, u.k = has_r, x_r, x_1, x_2, steps
    u.t_root, u.t_gl, u.n, u.b_first, u.b_mid, u.b_end = t_root, t_gl, max(n, 1), b_first, b_mid, b_end
    u.chunk_params = chunk_params
    u.emb_params = sh.chunk_params(range(0), True, False)
    u.head_params = sh.chunk_params(range(0), False, True)       # with tied embeddings: the last stage's copy
    u.root_params = sh.chunk_params(range(0), True, True)        # pp = 1: embedding, norm, head (tied: once)
    u.last_light = (n - counts[-1]) / n if n else 0.0    # the last chunk's missing share of a full chunk
    u.p2p = 0.0
    if pp > 1:
        msg = sh.act_msg / (p.tp if p.sp else 1)
        u.p2p = dur(OpKind.PP_SEND_ACT, group="pp", group_size=pp, msg_bytes=msg, wire_bytes=msg)
    return u


# ---- the two in-order streams of one stage, action by action --------------------------------------------------
# compile_plan gives each rank class one compute stream (forward, recompute, backward and their TP collectives)
# and one comm stream, in program order: [ZeRO-3 gathers (root, layers)] [K/V blocks] of a forward; [ZeRO-3
# layer gathers] [recompute's K/V] [backward's K/V, dK/dV] [DP buckets] of a backward. The edges are the event
# simulator's (engine.run): an op starts when its inputs allow, a compute op fed by k pipelined blocks (K/V: one
# per layer and ring step; ZeRO-3: one per layer) starts after the first block and ends no sooner than 1/k of its
# work after the last; bucket op j of n_ops starts once (j+1)/n_ops of its backward is done; a ZeRO-3 gather
# starts no earlier than the previous forward/backward (prefetch one op ahead). These functions apply those
# rules to one action's handful of ops: (cf, kf, ps) = when the compute stream is free, when the comm stream is
# free, the start of the last forward/backward.
_NEG = float("-inf")


def _forward(u: _Unit, t_f: float, cf: float, kf: float, ps: float,
             ready: float = _NEG) -> tuple[float, float, float]:
    """`ready`: when the input arrives (the K/V exchange waits for it; under PP the activation's receive)."""
    s, floor = cf, _NEG
    if u.t_gl:                                        # ZeRO-3 without PP: root, then the layers
        g = (kf if kf > ps else ps) + u.t_root
        kf = g + u.t_gl
        x = g + u.t_gl / u.n
        s = x if x > s else s
        floor = kf + t_f / u.n
    if u.x_f:
        kf = kf if kf > ready else ready
        x = kf + u.x_f / u.k
        s = x if x > s else s
        kf += u.x_f
        x = kf + t_f / u.k
        floor = x if x > floor else floor
    e = s + t_f
    return (e if e > floor else floor) + u.tp_f, kf, s


def _backward(u: _Unit, t_b: float, cf: float, kf: float, ps: float, ftail: float,
              bk: tuple[float, float, int] | None) -> tuple[float, float, float]:
    """`ftail`: the end of this micro-batch's forward (its K/V exchanges wait for it); `bk`: the DP buckets it
    issues as (t_all, t_last, n_ops), None when this backward does not reduce."""
    s, floor = (cf if cf > ftail else ftail), _NEG
    g_end = 0.0
    if u.t_gl:                                        # ZeRO-3 without PP: the layers again
        g = kf if kf > ps else ps
        kf = g_end = g + u.t_gl
        x = g + u.t_gl / u.n                          # into the first compute op: recompute, else backward
        s = x if x > s else s
    if u.has_r:
        t_r = u.t_r
        if u.t_gl:
            floor = g_end + t_r / u.n
        if u.x_r:
            x0 = kf if kf > ftail else ftail
            x = x0 + u.x_r / u.k
            s = x if x > s else s
            kf = x0 + u.x_r
            x = kf + t_r / u.k
            floor = x if x > floor else floor
        e = s + t_r
        cf = (e if e > floor else floor) + u.tp_r
        s, floor = cf, _NEG
    elif u.t_gl:
        floor = g_end + t_b / u.n
    if u.x_1:
        x0 = kf if kf > ftail else ftail
        k = u.k
        x = x0 + u.x_1 / k
        s = x if x > s else s
        x = x0 + u.x_1 + u.x_2 / k
        s = x if x > s else s
        kf = x0 + u.x_1 + u.x_2
        x = kf + t_b / k
        floor = x if x > floor else floor
    e = s + t_b
    cf = (e if e > floor else floor) + u.tp_b
    if bk is not None and bk[0]:
        kf = _buckets_end(kf, s, t_b, bk[0], bk[1], bk[2])
    return cf, kf, s


def _repeat(step, state: tuple, count: int, exact: int = 3) -> tuple:
    """`state` after `count` applications of `step(state, i)`: the first `exact` run, the rest extrapolated at the
    last one's increments (the streams' max-plus recurrence is periodic by then)."""
    prev = state
    for i in range(min(count, exact)):
        prev, state = state, step(state, i)
    if count > exact:
        state = tuple(a + (count - exact) * (a - b) for a, b in zip(state, prev))
    return state


def _single_stage(u: _Unit, afab: bool, m: int) -> tuple[float, float]:
    """pp = 1: (end of the last backward with its TP collectives, end of the comm stream) of the whole step."""
    t_f, t_b = u.t_f + u.t_head / 3, u.t_b + 2 * u.t_head / 3     # the head is in the same ops without PP
    last = (u.first[0], u.first[3], u.first[2])
    every = last if u.per_mb else None
    if afab:
        tails = []                                    # forward i's end: backward i's K/V exchanges wait for it

        def fwd(x, i):
            tails.append(_forward(u, t_f, *x))
            return tails[-1]
        cf, kf, ps = _repeat(fwd, (0.0, 0.0, 0.0), m)
        state = _repeat(lambda x, i: _backward(u, t_b, *x, tails[i][0], every), (cf, kf, ps), m - 1)
        cf, kf, _ = _backward(u, t_b, *state, cf, last)
        return cf, kf

    def unit(x, i):
        f = _forward(u, t_f, *x)
        return _backward(u, t_b, *f, f[0], every)
    state = _repeat(unit, (0.0, 0.0, 0.0), m - 1)
    f = _forward(u, t_f, *state)
    cf, kf, _ = _backward(u, t_b, *f, f[0], last)
    return cf, kf


def _period(u: _Unit, afab: bool, bk: tuple[float, float, int] | None, head: float = 0.0,
            jit: bool = False) -> float:
    """Under PP: the steady-state time per unit of one stage whose comm stream carries K/V blocks and per-micro-
    batch buckets (`bk`: t_all, t_last, n_ops), as the eigenvalue of the streams' 2×2 max-plus recurrence
    (cf, kf) -> (cf', kf') = A ⊗ (cf, kf): the maximum cycle mean of A's graph, max(a, d, (b + c)/2) (Baccelli et
    al. 1992, "Synchronization and Linearity", ch. 3), each entry read off one evaluation with the other stream
    at −∞ (tests/test_fast_cost_families.py iterates the recurrence instead). Without a path from the comm
    stream into compute (b = −∞) the compute stream runs at its own pace a and the comm backlog shows at the end
    of the step (comm_end). AFAB: a forward's period plus a backward's. `head`: the LM head's work (forward and
    backward, 1:2) in the unit, as on the last stage. `jit`: each input arrives just as the compute stream is free
    (a stage waiting on its pipeline neighbour, as in the fill and drain), so its K/V exchange cannot be
    prefetched."""
    t_f, t_b = u.t_f + head / 3, u.t_b + 2 * head / 3

    def eig(step) -> float:
        a, c = step(0.0, _NEG)
        b, d = step(_NEG, 0.0)
        if b == _NEG:
            return a
        return max(a, d, (b + c) / 2)

    def pair(cf, kf):
        f = _forward(u, t_f, cf, kf, _NEG, cf if jit else _NEG)
        return _backward(u, t_b, *f, f[0], bk)[:2]
    if afab:
        return eig(lambda cf, kf: _forward(u, t_f, cf, kf, _NEG, cf if jit else _NEG)[:2]) + \
            eig(lambda cf, kf: _backward(u, t_b, cf, kf, _NEG, cf if jit else _NEG, bk)[:2])
    return eig(pair)


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
