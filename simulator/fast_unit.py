"""What one unit (one micro-batch through one chunk of a stage) costs, for `fast_cost.fast_step`.

`_unit` prices the ops `loom.spec.compile.compile_plan` would emit for it, with the event simulator's cost model
(`costs.CostModel.duration`): its compute and TP/SP collectives (`_work`), its CP K/V exchanges, ZeRO-3 gathers
and DP buckets on the comm stream, the PP send, and the parameter counts the optimizer needs; the result is a
`fast_streams._Unit`. `_CTX` holds the memo tables shared by the plans of one search (shapes, meshes, cost
models, hardware profiles, durations); `_memo` and `_durations` read and fill them.
"""
from __future__ import annotations

from loom.spec.compile import MAX_BUCKET_OPS, _ring, _Shapes, split_layers
from loom.spec.mesh import Mesh
from loom.spec.units import chunk_units
from loom.spec.plan import Op, OpKind

from .costs import CostModel, exposed_overlap
from .fast_streams import _buckets_end, _Unit
from .hardware import HardwareProfile


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
