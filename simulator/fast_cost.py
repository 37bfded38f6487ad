"""Closed-form step time of a plan: the fast path `search` ranks every candidate with.

It prices the ops `loom.spec.compile.compile_plan` would emit for one micro-batch of one chunk (forward,
recompute, backward with their FLOPs and HBM bytes from `compile._Shapes`; their TP/SP collectives, CP K/V
exchanges, the PP send, the DP buckets, ZeRO gathers and the optimizer) with the event simulator's own cost
model (`costs.CostModel.duration`, `hardware.HardwareProfile`), and replaces the event simulation of the whole
step by the pipeline formula (Narayanan et al. 2021 §2.2; bubble (pp − 1)/(v·m) of the steady state):

  T_pipe = (m·v + pp − 1) · (t_unit + 2·t_p2p) + m·t_head              (v = vpp for interleaved, else 1)
  step   = T_pipe + exposed DP (gradient buckets of stage 0, the last to finish its backward)
           + optimizer + the ZeRO-1/2 post-step parameter gather,  ZeRO-3 gathers exposed per op,

with t_unit one micro-batch's forward + recompute + backward of one chunk (its TP collectives on the compute
stream; the comm stream's CP exchanges, ZeRO-3 gathers and per-micro-batch DP buckets when compute waits for
them), t_p2p one activation send (each unit receives one activation and one gradient: on the critical path in
the event simulation too) and t_head the LM head's work on the last stage. Agreement with `simulate_time` is
checked in tests/test_search.py (within 5 % on the winners of a sample) and measured in benchmarks/search_speed.py.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from loom.spec.compile import MAX_BUCKET_OPS, OPT_STATE_BYTES, _ring, _Shapes, split_layers
from loom.spec.mesh import Mesh
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
    __slots__ = ("t_f", "t_b", "t_r", "t_head", "tp_f", "tp_b", "tp_r", "x_f", "x_b", "x_wait", "g_unit",
                 "g_wait", "zero3_once", "first", "rest", "per_mb", "d_unit", "chunk_params", "emb_params",
                 "head_params", "root_params", "p2p", "last_light")


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


def _unit(spec, sh: _Shapes, cost: CostModel, n: int, pp: int, v: int) -> _Unit:
    p, t = spec.plan, spec.training
    dur = _durations(cost)
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

    # ---- the comm stream: CP exchanges, ZeRO-3 gathers, DP buckets -----------------------------------------
    # compile_plan puts all three on one in-order "comm" stream. Compute waits for the CP blocks (an op may start
    # after the first of its count blocks) and for the ZeRO-3 gathers (prefetched one op ahead), so with either
    # the pipeline advances per unit (one micro-batch through one chunk) at the pace of the slower stream.
    gb, pb = sh.gb, sh.pb
    chunk_params = sh.chunk_params(lay, False, False)
    x_f = x_b = x_wait = g_unit = g_wait = 0.0
    if p.cp > 1 and n:
        steps = n * (p.cp - 1)
        one = lambda count, msg=sh.kv_msg: dur(OpKind.CP_KV_EXCHANGE, group="cp",  # noqa: E731
                                               group_size=p.cp, count=count, msg_bytes=msg, wire_bytes=msg * count)
        # n·(cp − 1) K/V blocks per forward and recompute; the backward sends them again plus as many dK/dV (fp32)
        x_f = one(steps)
        x_b = one(steps) * (1 if t.recompute != "none" else 0) + one(steps) + one(steps, sh.dkv_msg)
        x_wait = one(steps) / steps
    zero3_once = 0.0
    dpcp = p.dp * p.cp                      # the gradient reduction / ZeRO group (compile_plan)
    if p.zero == 3 and dpcp > 1:
        per = chunk_params * pb / max(n, 1)
        t_g = dur(OpKind.ZERO_ALLGATHER, group="dp", group_size=dpcp, count=max(n, 1), msg_bytes=per,
                      wire_bytes=_ring(OpKind.ZERO_ALLGATHER, dpcp, per) * max(n, 1))
        if pp == 1:       # re-gathered before every forward and every backward (FSDP reshard_after_forward)
            g_unit, g_wait = 2 * t_g, t_g / max(n, 1)
        else:             # gathered once per chunk at its first forward; the first one cannot be prefetched
            zero3_once = t_g

    # DP: each chunk's buckets follow its last backward (ZeRO 0/1, ZeRO-3 under PP), or every backward (ZeRO-2,
    # ZeRO-3 without PP keep a gradient shard only, so each micro-batch's gradients are reduce-scattered); bucket-op k of n_ops may start once
    # (k+1)/n_ops of the backward is done, while the backward's own TP collectives follow it on compute.
    kind = OpKind.DP_ALLREDUCE if p.zero == 0 else OpKind.DP_REDUCESCATTER
    bucket = p.bucket_MB * 2**20

    def issue(params: float) -> tuple[float, float]:
        """(comm time, part of it left after the producing backward and its TP collectives). Buckets split the
        chunk evenly here; compile_plan uses the executor's units, padded to dp·cp (< dp·cp elements each)."""
        if dpcp <= 1:
            return 0.0, 0.0
        total = params * gb
        n_buckets = max(1, math.ceil(total / bucket))
        n_ops = min(n_buckets, MAX_BUCKET_OPS)
        t_all = dur(kind, group="dp", group_size=dpcp, count=n_buckets, msg_bytes=total / n_buckets,
                        wire_bytes=_ring(kind, dpcp, total / n_buckets) * n_buckets)
        end = 0.0
        for k in range(n_ops):
            end = max(end, (k + 1) / n_ops * t_b) + t_all / n_ops
        return t_all, max(0.0, end - t_b - tp_b)

    counts = [len(r) for r in split_layers(spec.model.layers, pp * v)] if p.uneven_split else [n]
    first = issue(sh.chunk_params(range(counts[0]), True, pp == 1 and v == 1))   # stage 0, chunk 0: + embedding
    rest = issue(chunk_params) if v > 1 else (0.0, 0.0)
    # compile_plan's per_micro_batch_reduction: ZeRO-2 always, ZeRO-3 without PP; under PP with tied embeddings
    # stage 0's first chunk (it holds the table) reduces once per step, after its last backward (the tail below)
    per_mb = p.zero == 2 or (p.zero == 3 and pp == 1)
    tied_once = per_mb and pp > 1 and spec.model.tied_embeddings
    d_unit = ((0.0 if tied_once else first[0]) + (v - 1) * rest[0]) / v if per_mb else 0.0

    u = _Unit()
    u.t_f, u.t_b, u.t_r, u.t_head, u.tp_f, u.tp_b, u.tp_r = t_f, t_b, t_r, t_head, tp_f, tp_b, tp_r
    u.x_f, u.x_b, u.x_wait, u.g_unit, u.g_wait, u.zero3_once = x_f, x_b, x_wait, g_unit, g_wait, zero3_once
    u.first, u.rest, u.per_mb, u.d_unit = first, rest, per_mb, d_unit
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
    x_f, x_b, x_wait, g_unit, g_wait, zero3_once = u.x_f, u.x_b, u.x_wait, u.g_unit, u.g_wait, u.zero3_once
    first, rest, per_mb, d_unit, p2p = u.first, u.rest, u.per_mb, u.d_unit, u.p2p
    gb, pb = sh.gb, sh.pb

    # Per unit, forward part and backward part on each stream (the backward part carries the recompute and the
    # DP buckets when they are per micro-batch; ZeRO-3 without PP gathers before each).
    c_f = t_f + tp_f
    c_b = t_r + t_b + tp_r + tp_b
    k_f = x_f + g_unit / 2
    # per-micro-batch DP buckets pace every unit without PP; under PP (ZeRO-2) they run beside the other stages'
    # work, so only the comm stream's total bounds the pipeline (below)
    k_b = x_b + g_unit / 2 + (d_unit if pp == 1 else 0.0)
    c_unit, k_unit = c_f + c_b, k_f + k_b
    x_unit = x_f + x_b
    blocking = x_unit > 0 or g_unit > 0
    wait = x_wait + g_wait
    # With per-micro-batch DP buckets in the queue, the next op's gather / K/V exchange waits behind the last
    # bucket, so it cannot be prefetched: the op waits for the bucket tail and the whole gather (with CP, whose
    # first block is queued behind the gather) or its first layer (without). Under PP (ZeRO-2 with CP) this is not
    # charged per unit (it overstates plans with few micro-batches); the comm stream's total bounds the step
    # instead (comm_end), which understates ZeRO-2 + CP + PP with many micro-batches (~15 %, docs/measurements.md).
    queued = 0.0
    if blocking and per_mb and pp == 1:
        queued = first[1] + (g_unit / 2 * (1.0 if x_unit > 0 else 1.0 / max(n, 1)) if g_unit else 0.0)
    if blocking and p.schedule == "afab":       # all forwards, then all backwards: the streams pair up per phase
        unit = max(c_f, k_f) + max(c_b + queued, k_b) + 2 * wait
    elif blocking and g_unit:
        # ZeRO-3 without PP, 1F1B: the queue per unit is [gather F, (K/V F), gather B, (K/V R, B), DP buckets];
        # the forward starts after its gather's first layer (all of it when K/V blocks queue behind it), the
        # recompute/backward once the second gather is in, then the buckets' tail delays the next gather.
        t_g = g_unit / 2
        f_ready = t_g + x_wait if x_unit else g_wait
        b_ready = 2 * t_g + x_f + (x_wait if x_unit else t_r / max(n, 1))
        unit = first[1] + max(f_ready + c_f + t_r, b_ready) + t_b + tp_r + tp_b
        unit = max(unit, k_unit + wait)
    elif blocking:
        unit = max(c_unit + queued, k_unit) + wait
    else:
        unit = c_unit

    # ---- pipeline -----------------------------------------------------------------------------------------
    units = m * v + pp - 1
    # the last stage also runs the LM head (less one chunk's missing layers under an uneven split)
    head = m * max(0.0, t_head - u.last_light * unit)
    t_pipe = units * (unit + 2 * p2p) + head + zero3_once
    lead = (m * v * c_f if p.schedule == "afab" else c_f) + (pp - 1) * (unit + 2 * p2p)
    if per_mb and not blocking and pp == 1:
        # the buckets run beside the compute from the first backward on; what does not fit shows
        t_pipe = max(t_pipe, lead + m * d_unit)
    # ZeRO-2 under PP: stage 0's buckets (and its backwards' K/V blocks, same stream) run from its first backward
    # on (after the fill and, with afab, all forwards); the stream's end bounds the step (tail included)
    comm_end = lead + m * v * (d_unit + x_b) if per_mb and pp > 1 else 0.0

    # ---- the tail on stage 0 (the last to finish its backward) ---------------------------------------------
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
        msg = stage_params * pb / v
        zero12 = dur(OpKind.ZERO_ALLGATHER, group="dp", group_size=dpcp, count=v, msg_bytes=msg,
                         wire_bytes=_ring(OpKind.ZERO_ALLGATHER, dpcp, msg) * v)
    elif p.zero in (1, 2) and dpcp > 1:
        # overlap_param_gather (compile_plan): each chunk's units gathered before its first forward. Without
        # interleaving bucket by bucket from when the forward could start (first unit exposed, the forward no
        # faster than the gather): each stage's first forward grows by e, and the pipeline fill passes all pp
        # stages. Interleaved: every chunk's gather from the step's start, whole (Megatron's align_param_gather):
        # stage 0 waits for chunk 0's, and chunk c's is late if c gathers outlast c·pp forwards.
        g_units = sh.dp_units(range(n), True, pp == 1 and v == 1)   # stage 0's first chunk, as compile_plan
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
    stall = m * v * (unit - c_unit)                    # the comm stream holding compute back
    share = (x_unit + x_wait) / (k_unit + x_wait + g_wait) if blocking else 0.0
    return Breakdown(compute_s=m * v * (t_f + t_b) + m * t_head, recompute_s=m * v * t_r,
                     bubble_s=(pp - 1) * (unit + 2 * p2p), pp_exposed_s=m * v * 2 * p2p,
                     tp_exposed_s=m * v * (tp_f + tp_b + tp_r), cp_exposed_s=stall * share,
                     dp_exposed_s=dp_exposed + max(0.0, t_pipe - units * (unit + 2 * p2p) - head - zero3_once),
                     zero_exposed_s=stall * (1 - share) + zero12 + zero3_once, optimizer_s=t_opt,
                     step_time_s=step)


def mfu(spec, step_time_s: float) -> float:
    """Model FLOPs utilization in the PaLM convention (ModelSpec.model_flops_per_token), as simulate_time."""
    return spec.model.model_flops_per_token() * spec.tokens_per_step / (
        step_time_s * spec.world_size * spec.gpu.peak_flops[spec.training.precision])
