"""compile_plan(spec) -> Plan: expand the schedule of every pipeline stage into ops with FLOPs, bytes and edges.

Per rank and per micro-batch of b·s tokens (b micro-batch, s seq_len, t = tp, c = cp, h hidden, ab activation bytes):
- FORWARD of a chunk of n layers: n·(2·P_layer_matmul + attention core) FLOPs per token (ModelSpec, Narayanan et al.
  2021 §5.1), plus the LM head 2·V·h on the last virtual stage; divided by t·c (TP shards every matmul, CP the
  tokens; zigzag CP balances causal attention). BACKWARD = 2 × FORWARD. RECOMPUTE: full reruns the layers' forward,
  selective the attention core (Korthikanti et al. 2022 §4.2), op (torchtitan's per-op selective AC) the unsaved
  matmuls (every second one) and all memory-bound work - the same accounting as train_flops_per_token.
- TP (Megatron-LM, Shoeybi et al. 2019 §3): per layer 2 all-reduces of b·(s/c)·h in the forward (after attention
  and MLP) and 2 in the backward; with sequence parallel each becomes an all-gather + reduce-scatter pair
  (Korthikanti et al. 2022 §4.2.2), i.e. 2 AG + 2 RS per layer per pass, and the backward all-gathers the QKV
  and FC1 inputs again from the shards they saved (same §: 2 more AG per layer, 1 for the LM head input). Plus
  what the executor issues around the layers: the vocab-parallel embedding's reduction (forward; SP:
  reduce-scatter forward, all-gather backward), the LM head input's entry (backward all-reduce; SP: all-gather
  forward, reduce-scatter backward) and the vocab-parallel cross-entropy's 3 all-reduces of one fp32 per token.
  Full and op recompute repeat the forward's up to torch checkpoint's early stop: 1 all-reduce per layer (SP: 2 AG
  + 1 RS).
- CP ring attention (Liu et al. 2023, Ring Attention; Megatron-LM/TransformerEngine p2p CP): c-1 steps per layer,
  each sending this rank's K and V block, b·(s/c)·2·kv_dim/t elements; the backward sends the K/V blocks again
  and c-1 dK/dV blocks, in fp32 (the accumulator's precision). Any recompute reruns attention, hence its exchange.
- PP: one activation (or its gradient) of b·(s/c)·h elements per send, /t with sequence parallel
  (Megatron scatters the pipeline message over the TP group when SP is on).
- DP over the dp×cp group (parameters are replicated over cp too): gradient buckets of bucket_MB in reverse layer
  order (PyTorch DDP, Li et al. 2020 §3.2.3), per chunk (as Megatron keeps one buffer per model chunk); all-reduce
  with ZeRO-0; reduce-scatter with ZeRO >= 1 (Megatron's distributed optimizer reduce-scatters for ZeRO-1 too,
  then all-gathers updated params after the step). ZeRO-0/1 reduce once per step, after the last micro-batch
  (DDP no_sync / Megatron's accumulation buffer); ZeRO-2/3 hold only a gradient shard, so they reduce-scatter
  after every micro-batch (DeepSpeed ZeRO-2; FSDP under gradient accumulation) - ZeRO-2 under PP too, ZeRO-3
  under PP once per step (torchtitan syncs on the last backward under PP), and under PP with tied embeddings the
  chunk holding the table once per step (`per_micro_batch_reduction`). Bytes are those on the wire: each rank's
  own parameters (spec/units.py: replicated norms, row-parallel biases and position table; vocabulary padded to
  a multiple of tp; the tied table's copy on the last stage under PP) grouped into the executor's units (buckets
  closed at parameter boundaries; ZeRO-3: layers and root), each padded to a multiple of dp·cp so it splits into
  equal shards (executor/dp.py; Megatron-LM param_and_grad_buffer.py pads its buckets the same way).
- ZeRO-3 (Rajbhandari et al. 2020 §5; FSDP): every chunk's layers are all-gathered (one call per layer) before
  its forward and again before its backward, prefetched one op ahead; the root unit (embedding, final norm, head)
  once per micro-batch, before the forward (kept until that micro-batch's gradients are reduced). With PP each
  chunk, root included, once per step before its first forward (torchtitan keeps PP chunks unsharded).
Not listed (bookkeeping, tests/test_plan_executor_agreement.py names them): the global-norm scalars, the logged
loss, the SP-replicated parameters' gradient all-reduce over tp and, with tied embeddings under PP, the tied
gradient's sum over the first and last stage.
Ring collective volumes per rank (Patarasuk & Yuan 2009; NCCL docs "Collective operations"/nccl-tests
PERFORMANCE.md): all-reduce 2(n-1)/n·B, all-gather and reduce-scatter (n-1)/n·B, with B the full tensor.
"""
from __future__ import annotations

from .mesh import Mesh
from .plan import Op, OpKind, Plan, class_name
from .schedules import build_schedule
from .units import chunk_tensors, chunk_units

ACT_BYTES = {"bf16": 2, "fp16": 2, "fp8": 2, "fp32": 4}      # fp8 runs matmuls in fp8, keeps activations bf16
PARAM_BYTES = ACT_BYTES
GRAD_BYTES = {"fp32": 4, "bf16": 2}
# HBM traffic of one optimizer step per parameter (fused kernels; apex/torch fused AdamW): read grad, read+write
# fp32 master weight (8), read+write m and v (16), write the low-precision copy (2): 26 + grad bytes.
OPT_STATE_BYTES = {"adamw": 26, "adam": 26, "sgd": 10}
FP32_BYTES = 4
MAX_BUCKET_OPS = 8          # DP buckets per chunk are grouped into at most this many ops (each carries `count`)


def split_layers(layers: int, chunks: int) -> list[range]:
    """Contiguous layer ranges for each virtual stage. Even when it divides; otherwise the first and last virtual
    stages (which also hold the embedding and the LM head) get fewer layers, as Llama 3 405B does (126 layers on
    16 stages, Dubey et al. 2024 §3.3.2), and the rest spread one extra layer from the middle out."""
    if chunks > layers:
        raise ValueError(f"cannot split {layers} layers over {chunks} virtual stages")
    base, extra = divmod(layers, chunks)
    counts = [base] * chunks
    middle = list(range(1, chunks - 1)) or list(range(chunks))
    middle.sort(key=lambda j: abs(j - (chunks - 1) / 2))
    for j in middle[:extra]:
        counts[j] += 1
    for j in range(extra - len(middle)):             # only when chunks <= 2 and extra > middle
        counts[j] += 1
    out, start = [], 0
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out


class _Shapes:
    """Per-rank sizes of one micro-batch, derived once from the spec."""

    def __init__(self, spec) -> None:
        m, p, t = spec.model, spec.plan, spec.training
        self.model, self.par, self.train = m, p, t
        self.tp, self.cp, self.dp = p.tp, p.cp, p.dp
        self.tokens = t.micro_batch * m.seq_len                   # tokens of one micro-batch on one replica
        self.shard = p.tp * p.cp                                   # FLOPs are split over tp·cp ranks
        self.ab = ACT_BYTES[t.precision]
        self.pb = PARAM_BYTES[t.precision]
        self.gb = GRAD_BYTES[t.grad_dtype]
        self.layer_f = 2.0 * m.layer_matmul_params()
        self.attn_f = m.attention_core_flops_per_token(causal=True)
        self.head_f = 2.0 * m.vocab * m.hidden
        # FLOPs per token of one layer's four GEMMs (forward; dgrad and wgrad are as many each): what a TP
        # collective hides in under tp_comm_overlap (Σ = layer_f).
        self.gemm_f = {"qkv": 2.0 * m.hidden * (m.q_dim + 2 * m.kv_dim), "proj": 2.0 * m.q_dim * m.hidden,
                       "fc1": 2.0 * m.hidden * m.ffn_hidden * (2 if m.gated else 1),
                       "fc2": 2.0 * m.ffn_hidden * m.hidden}
        h, f = m.hidden, m.ffn_hidden
        # HBM bytes per token per layer, forward, for the memory-bound work (why: these ops are not counted in
        # FLOPs). Norms 2×(read+write h), residual adds 2×(read 2h, write h), activation (SwiGLU reads 2f writes f;
        # GeLU reads f writes f), RoPE read+write q and k. Replicated over TP ranks unless SP shards them.
        replicated = (4 * h + 6 * h) / (p.tp if p.sp else 1)
        sharded = ((3 * f if m.gated else 2 * f) + 2 * (m.q_dim + m.kv_dim)) / p.tp
        self.layer_mem = (replicated + sharded) * self.ab
        if t.precision == "fp8":
            # Dynamic-scaled fp8 GEMMs (torchao float8 / TransformerEngine): each GEMM input is read once for its
            # amax and once to cast, and written in fp8: 2·ab + 1 bytes per element. Forward inputs: h (QKV),
            # q_dim (output proj), h (MLP in), f (MLP out); /tp where sharded. (The backward casts its output
            # gradients likewise; it is charged 2× the forward's bytes like the rest.)
            cast_in = (2 * h / (p.tp if p.sp else 1) + (m.q_dim + f) / p.tp)
            self.layer_mem += cast_in * (2 * self.ab + 1)
        # Cross-entropy over vocab-parallel logits: write logits, then ~3 fp32 passes (max, exp-sum, grad).
        self.head_mem = m.vocab / p.tp * (self.ab + 12)
        self.op_f = m.op_recompute_flops_per_token()              # per-op recompute: the unsaved matmuls
        self.act_msg = self.tokens / p.cp * h * self.ab           # one full activation of this CP rank
        self.kv_msg = self.tokens / p.cp * 2 * m.kv_dim / p.tp * self.ab
        # Ring attention's backward passes the dK/dV accumulator on in fp32 (the precision of the cp-1 partial
        # sums; executor/cp_ring.py, as TransformerEngine's fp32 dkv accumulation): 4 bytes per element.
        self.dkv_msg = self.tokens / p.cp * 2 * m.kv_dim / p.tp * FP32_BYTES
        # Vocab-parallel cross-entropy (Megatron-LM tensor_parallel/cross_entropy.py): 3 all-reduces of one fp32
        # per token (max logit, target logit, sum of exponentials).
        self.ce_msg = self.tokens / p.cp * FP32_BYTES
        self.dpcp = p.dp * p.cp                                   # gradient reduction group: dp and cp
        self._params: dict[tuple[int, bool, bool], int] = {}
        self._units: dict[tuple[int, bool, bool], list[int]] = {}

    def chunk_params(self, layers: range, first: bool, last: bool) -> float:
        """Parameters one rank holds for a chunk (spec/units.py: TP shards the matmuls, their column-parallel
        biases and the vocabulary, padded to a multiple of tp; norms, row-parallel biases and the learned position
        table are replicated; under PP with tied embeddings the last stage holds its own copy of the table)."""
        key = (len(layers), first, last)
        n = self._params.get(key)
        if n is None:
            n = self._params[key] = sum(q.numel for q in chunk_tensors(self.model, self.tp, self.par.sp,
                                                                       range(len(layers)), first, last))
        return n

    def dp_units(self, layers: range, first: bool, last: bool) -> list[int]:
        """Elements of each DP unit of a chunk, in reduction order, each padded to a multiple of dp·cp: the
        buffers the DP/ZeRO collectives carry (spec/units.py; executor/dp.py; Megatron's padded buckets)."""
        key = (len(layers), first, last)
        u = self._units.get(key)
        if u is None:
            p = self.par
            u = self._units[key] = [x.numel for x in chunk_units(self.model, self.tp, p.sp, p.zero, p.bucket_MB,
                                                                 self.gb, self.dpcp, range(len(layers)), first,
                                                                 last)]
        return u


def _ring(kind: OpKind, n: int, msg: float) -> float:
    """Bytes one rank sends in one ring collective over n ranks on a tensor of msg bytes."""
    if n <= 1:
        return 0.0
    if kind in (OpKind.TP_ALLREDUCE, OpKind.DP_ALLREDUCE):
        return 2.0 * (n - 1) / n * msg
    return (n - 1) / n * msg


class _Builder:
    """Collects ops and edges in plain lists and dicts."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.sh = _Shapes(spec)
        self.ops: list[Op] = []
        self.edges: dict[tuple[int, int], tuple[float, float]] = {}
        self.programs: dict[str, list[int]] = {}
        self.degree = {d: spec.plan.degree(d) for d in ("tp", "cp", "pp", "dp")}
        # DP/ZeRO collectives run over dp×cp: parameters are replicated over cp too (Megatron-LM's data-parallel
        # group with context parallelism; torchtitan's dp_shard×cp FSDP mesh). Their ops keep group "dp".
        self.degree["dp"] = spec.plan.dp * spec.plan.cp

    def add(self, stage: int, kind: OpKind, stream: str, **kw) -> int:
        rc = class_name(stage)
        prog = self.programs.setdefault(rc, [])
        if "group" in kw:
            kw["group_size"] = self.degree[kw["group"]]
        op = Op(id=len(self.ops), kind=kind, stage=stage, rank_class=rc, order=len(prog), stream=stream, **kw)
        self.ops.append(op)
        prog.append(op.id)
        return op.id

    def edge(self, u: int, v: int, frac: float = 1.0, tail: float = 0.0) -> None:
        d = self.edges.get((u, v))
        if d is None:
            self.edges[(u, v)] = (frac, tail)
        else:
            self.edges[(u, v)] = (max(d[0], frac), max(d[1], tail))

    def collective(self, stage: int, kind: OpKind, count: int, msg: float, **kw) -> int | None:
        dim = kind.dim
        n = self.degree[dim]
        if n <= 1 or count <= 0:
            return None
        wire = msg * count if kind == OpKind.CP_KV_EXCHANGE else _ring(kind, n, msg) * count
        stream = "compute" if dim == "tp" else "comm"
        return self.add(stage, kind, stream, msg_bytes=msg, wire_bytes=wire, count=count, group=dim, **kw)


def compile_plan(spec) -> Plan:
    par, train = spec.plan, spec.training
    pp, m = par.pp, spec.micro_batches
    v = par.vpp if par.schedule == "interleaved" else 1
    if m < 1:
        raise ValueError(f"global_batch {train.global_batch} gives no micro-batch per replica "
                         f"(dp·micro_batch = {par.dp * train.micro_batch})")
    mesh = Mesh.from_spec(spec)
    sched = build_schedule(par.schedule, pp, m, v)
    vstages = split_layers(spec.model.layers, pp * v)
    stage_chunks = [[vstages[c * pp + s] for c in range(v)] for s in range(pp)]
    b = _Builder(spec)
    sh = b.sh
    recompute = train.recompute
    last_v = pp * v - 1

    tails: dict[tuple[str, int, int, int], int] = {}       # (F|B, stage, chunk, mb) -> op whose end = output ready
    sends: dict[tuple[str, int, int], int] = {}            # (ACT|GRAD, mb, receiving virtual stage) -> send op
    recvs: list[tuple[int, str, int, int]] = []            # (recv op, ACT|GRAD, mb, this virtual stage)
    dp_ops: dict[int, list[int]] = {}
    main_compute: dict[int, list[int]] = {}                # stage -> FORWARD/BACKWARD ids, for ZeRO-3 prefetch

    for s in range(pp):
        last_b = {c: max(i for i, a in enumerate(sched[s]) if a.kind == "B" and a.chunk == c) for c in range(v)}
        first_f = {c: min(i for i, a in enumerate(sched[s]) if a.kind == "F" and a.chunk == c) for c in range(v)}
        pending_recv: int | None = None
        for idx, a in enumerate(sched[s]):
            c, mb = a.chunk, a.microbatch
            j = c * pp + s
            layers = stage_chunks[s][c]
            n = len(layers)
            first, last = j == 0, j == last_v
            toks = sh.tokens / sh.shard
            pp_msg = sh.act_msg / (sh.tp if par.sp else 1)
            common = dict(chunk=c, microbatch=mb, layers=layers)
            if a.kind in ("RECV_ACT", "RECV_GRAD"):
                kind = OpKind.PP_RECV_ACT if a.kind == "RECV_ACT" else OpKind.PP_RECV_GRAD
                pending_recv = b.add(s, kind, "p2p", msg_bytes=pp_msg, group="pp", peer=a.peer, **common)
                recvs.append((pending_recv, a.kind[5:], mb, j))
                continue
            if a.kind in ("SEND_ACT", "SEND_GRAD"):
                kind = OpKind.PP_SEND_ACT if a.kind == "SEND_ACT" else OpKind.PP_SEND_GRAD
                op = b.add(s, kind, "p2p", msg_bytes=pp_msg, wire_bytes=pp_msg, group="pp", peer=a.peer, **common)
                b.edge(tails[("F" if a.kind == "SEND_ACT" else "B", s, c, mb)], op)
                dst = j + 1 if a.kind == "SEND_ACT" else j - 1
                sends[(a.kind[5:], mb, dst)] = op
                continue
            # ---- a compute action: F or B of (chunk, mb) ----
            before = [pending_recv] if pending_recv is not None else []
            pending_recv = None
            if a.kind == "B":
                before.append(tails[("F", s, c, mb)])
            dpcp = sh.dpcp
            # ZeRO-3 without PP (executor/dp.py; FSDP reshard_after_forward): a chunk's layers are gathered one
            # call per layer before every forward and again before every backward; the root unit (embedding, final
            # norm, LM head: the first/last virtual stage's parameters outside the layers) once per micro-batch,
            # before its forward, kept until that micro-batch's backward has reduced it. With PP the gathered
            # chunk stays for the whole step (torchtitan turns resharding off under PP, else every micro-batch
            # would gather again), so only the first forward of each chunk gathers, root and layers.
            zero3 = root = None
            if par.zero == 3 and dpcp > 1 and (pp == 1 or (a.kind == "F" and idx == first_f[c])):
                if a.kind == "F" and (first or last):
                    root = b.collective(s, OpKind.ZERO_ALLGATHER, 1,
                                        sum(sh.dp_units(range(0), first, last)) * sh.pb, **common)
                if n:                                              # one unit per layer, each padded
                    zero3 = b.collective(s, OpKind.ZERO_ALLGATHER, n,
                                         sh.dp_units(range(1), False, False)[0] * sh.pb, **common)
                for g in (root, zero3):
                    if g is not None and main_compute.get(s):
                        b.edge(main_compute[s][-1], g, frac=0.0)          # prefetch: one op ahead, no further
            # overlap_param_gather (ZeRO-1/2, Megatron's distributed optimizer): the updated parameters are
            # all-gathered at the next step's forward instead of after the optimizer - in the steady state, at the
            # start of this step, before each chunk's first forward. Megatron-LM (core/distributed/
            # distributed_data_parallel.py forward pre-hooks; param_and_grad_buffer.py finish_param_sync): a
            # module waits for its bucket's gather, which then dispatches the next bucket's, so the forward runs
            # one bucket behind the gather (pipelined edge, 1/units) and the first bucket is exposed. Without
            # interleaving the first bucket is dispatched by the forward's pre-hook (after its input arrived);
            # with it Megatron's align_param_gather dispatches every chunk's gathers at the step's start, in
            # bucket order (reverse layer order), so a chunk's first forward waits for its whole gather.
            pgather = None
            if (par.overlap_param_gather and par.zero in (1, 2) and dpcp > 1 and a.kind == "F"
                    and idx == first_f[c]):
                units = sh.dp_units(layers, first, last)
                pgather = b.collective(s, OpKind.ZERO_ALLGATHER, len(units), sum(units) * sh.pb / len(units),
                                       **common)
                for u in (before if v == 1 else []):
                    b.edge(u, pgather)
            f_flops = toks * (n * (sh.layer_f + sh.attn_f) + (sh.head_f if last else 0.0))
            f_attn = toks * n * sh.attn_f
            f_mem = sh.tokens / sh.cp * (n * sh.layer_mem + (sh.head_mem if last else 0.0))
            cp_steps = n * (par.cp - 1)
            group_ops: list[int] = []

            def tp_ops(kind: OpKind) -> list[tuple]:
                """The TP/SP collectives a compute op issues (executor/tp.py's conjugate operators, per layer two
                TP regions, each entered and left; Shoeybi et al. 2019 §3, Korthikanti et al. 2022 §4.2.2):
                - forward: per layer 2 leaves (all-reduce; SP reduce-scatter) and, with SP, 2 entries (all-gather);
                  the vocab-parallel embedding leaves TP once (first virtual stage) and, with SP, the LM head's
                  input enters once (all-gather, last); the cross-entropy's 3 all-reduces of one fp32 per token;
                - backward: the conjugates: per layer 2 entries (all-reduce; SP reduce-scatter) and, with SP, 2
                  leaves (all-gather); the LM head input's entry (last) and, with SP, the embedding's leave (first);
                  with SP also the re-gathers of the column-parallel linears' saved input shards (Korthikanti et
                  al. 2022 §4.2.2; executor/tp.py column_parallel_linear): per layer 2 (QKV, FC1) and the LM head's;
                - full recompute: torch.utils.checkpoint (non-reentrant) stops the rerun once the last saved
                  tensor is rebuilt (`_checkpoint_early_stop`), so the MLP's leave, the layer's last collective,
                  is not repeated: 1 all-reduce per layer; SP: 2 all-gathers and 1 reduce-scatter.
                With tp_comm_overlap the per-layer SP collectives are split by the GEMM they hide in (tp_overlap)."""
                if par.tp_comm_overlap:
                    return tp_overlap_ops(kind)
                act, fst, lst = sh.act_msg, int(first), int(last)
                if kind == OpKind.FORWARD:
                    ops = [(OpKind.SP_ALLGATHER, 2 * n + lst, act), (OpKind.SP_REDUCESCATTER, 2 * n + fst, act)] \
                        if par.sp else [(OpKind.TP_ALLREDUCE, 2 * n + fst, act)]
                    return ops + ([(OpKind.TP_ALLREDUCE, 3, sh.ce_msg)] if last else [])
                if kind == OpKind.BACKWARD:
                    return [(OpKind.SP_ALLGATHER, 4 * n + fst + lst, act),
                            (OpKind.SP_REDUCESCATTER, 2 * n + lst, act)] \
                        if par.sp else [(OpKind.TP_ALLREDUCE, 2 * n + lst, act)]
                if recompute not in ("full", "op"):        # op: the same early stop (the down projection's
                    return []                              # input is the last tensor rebuilt)
                return [(OpKind.SP_ALLGATHER, 2 * n, act), (OpKind.SP_REDUCESCATTER, n, act)] if par.sp \
                    else [(OpKind.TP_ALLREDUCE, n, act)]

            def tp_overlap_ops(kind: OpKind) -> list[tuple]:
                """SP collectives with TransformerEngine's default userbuffers overlaps (transformer_engine/
                pytorch/module/base.py, initialize_ub: methods and get_default_config), one op per GEMM partner,
                as (kind, count, msg, method, GEMM FLOPs per call, splits):
                - forward: the all-gathers before QKV and FC1 by ring exchange with those GEMMs ("qkv_fprop",
                  "fc1_fprop": num_splits = tp); the reduce-scatters after the output projection and FC2
                  pipelined in 4 chunks ("proj_fprop", "fc2_fprop": num_splits 4);
                - backward: the all-gathers of the output gradient by ring exchange with the proj/FC2 dgrad GEMMs
                  ("proj_dgrad", "fc2_dgrad"); the reduce-scatters of the QKV/FC1 input gradient in bulk beside
                  their wgrad GEMMs ("qkv_wgrad", "fc1_wgrad") and the re-gathers of their saved input shards in
                  bulk beside their dgrad GEMMs ("qkv_dgrad", "fc1_dgrad"); the LM head's re-gather unoverlapped;
                - full recompute reruns the forward's up to the early stop (QKV, FC1 all-gathers; proj's RS);
                  "op" recompute (torchtitan's per-op policy) reruns them without the overlap.
                The embedding's, the LM head input's and the cross-entropy's collectives are not in TE layers
                (Megatron's own VocabParallelEmbedding / ColumnParallelLinear): not overlapped."""
                act, fst, lst, tp, g = sh.act_msg, int(first), int(last), sh.tp, sh.gemm_f
                AG, RS = OpKind.SP_ALLGATHER, OpKind.SP_REDUCESCATTER
                if kind == OpKind.FORWARD:
                    ops = [(AG, n, act, "ring", toks * g["qkv"], tp), (AG, n, act, "ring", toks * g["fc1"], tp),
                           (AG, lst, act, "", 0.0, 1), (RS, n, act, "pipeline", toks * g["proj"], 4),
                           (RS, n, act, "pipeline", toks * g["fc2"], 4), (RS, fst, act, "", 0.0, 1)]
                    return ops + ([(OpKind.TP_ALLREDUCE, 3, sh.ce_msg, "", 0.0, 1)] if last else [])
                if kind == OpKind.BACKWARD:
                    return [(AG, n, act, "ring", toks * g["proj"], tp), (AG, n, act, "ring", toks * g["fc2"], tp),
                            (AG, n, act, "bulk", toks * g["qkv"], 1), (AG, n, act, "bulk", toks * g["fc1"], 1),
                            (AG, fst + lst, act, "", 0.0, 1), (RS, n, act, "bulk", toks * g["qkv"], 1),
                            (RS, n, act, "bulk", toks * g["fc1"], 1), (RS, lst, act, "", 0.0, 1)]
                if recompute == "op":        # torchtitan's policy (no TE equivalent): charged unoverlapped
                    return [(AG, 2 * n, act, "", 0.0, 1), (RS, n, act, "", 0.0, 1)]
                if recompute != "full":
                    return []
                return [(AG, n, act, "ring", toks * g["qkv"], tp), (AG, n, act, "ring", toks * g["fc1"], tp),
                        (RS, n, act, "pipeline", toks * g["proj"], 4)]

            def compute(kind: OpKind, flops: float, attn: float, mem: float,
                        cp_msgs: list[tuple[int, float]]) -> int:
                cp_ops = [c for c in (b.collective(s, OpKind.CP_KV_EXCHANGE, k, msg, **common) for k, msg in cp_msgs)
                          if c is not None]
                op = b.add(s, kind, "compute", flops=flops, attn_flops=attn, mem_bytes=mem, **common)
                for u in before + ([group_ops[-1]] if group_ops else []):
                    b.edge(u, op)
                for cp_op, (k, _) in zip(cp_ops, cp_msgs):
                    for u in before:
                        b.edge(u, cp_op)
                    b.edge(cp_op, op, frac=1.0 / k, tail=1.0 / k)   # KV blocks overlap attention
                if root is not None and not group_ops:
                    b.edge(root, op)
                if zero3 is not None and not group_ops:
                    b.edge(zero3, op, frac=1.0 / n, tail=1.0 / n)  # layer-by-layer prefetch
                if pgather is not None and not group_ops:
                    k = b.ops[pgather].count
                    b.edge(pgather, op, *((1.0 / k, 1.0 / k) if v == 1 else (1.0, 0.0)))  # bucket by bucket
                group_ops.append(op)
                for k, count, msg, *ov in tp_ops(kind):
                    extra = dict(overlap=ov[0], overlap_flops=ov[1] * count, overlap_splits=ov[2]) \
                        if ov and ov[0] else {}
                    t = b.collective(s, k, count, msg, **extra, **common)
                    if t is not None:
                        b.edge(group_ops[-1], t)
                        group_ops.append(t)
                return op

            # Ring attention (executor/cp_ring.py): per layer cp-1 K/V blocks in the forward (and any recompute,
            # which reruns attention); the backward sends the K/V blocks again and cp-1 dK/dV accumulators (fp32).
            kv = [(cp_steps, sh.kv_msg)]
            if a.kind == "F":
                main = compute(OpKind.FORWARD, f_flops, f_attn, f_mem, kv)
                tails[("F", s, c, mb)] = group_ops[-1]
            else:
                if recompute != "none" and n > 0:
                    if recompute == "full":
                        r = (toks * n * (sh.layer_f + sh.attn_f), f_attn, sh.tokens / sh.cp * n * sh.layer_mem)
                    elif recompute == "op":                # unsaved matmuls + all memory-bound work
                        r = (toks * n * sh.op_f, 0.0, sh.tokens / sh.cp * n * sh.layer_mem)
                    else:
                        r = (toks * n * sh.attn_f, f_attn, 0.0)
                    compute(OpKind.RECOMPUTE, *r, kv)
                main = compute(OpKind.BACKWARD, 2 * f_flops, 2 * f_attn, 2 * f_mem, kv + [(cp_steps, sh.dkv_msg)])
                tails[("B", s, c, mb)] = group_ops[-1]
                # ZeRO-0/1 accumulate full gradients and reduce once per step, from the chunk's last backward (DDP
                # no_sync; Megatron's accumulation buffer, reduce-scattered in place by its distributed optimizer).
                # ZeRO-2/3 keep only a gradient shard, so they reduce-scatter after every micro-batch's backward
                # (DeepSpeed ZeRO-2, runtime/zero/stage_1_and_2.py: buckets reduced as the backward fills them,
                # every micro-batch under accumulation; FSDP without no_sync). ZeRO-2 does so under PP too; ZeRO-3
                # under PP reduces once per step, on the chunk's last backward: torchtitan's pipeline schedules
                # sync FSDP gradients only on the last backward (torch.distributed.pipelining
                # stage.backward_maybe_with_nosync) and keep the stage unsharded, whose memory simulator/memory.py
                # models and checks against published torchtitan runs. Under PP with tied embeddings the chunk
                # holding the table (first or last virtual stage) reduces once per step as well, at any ZeRO stage:
                # the cross-stage sum of the tied gradient (executor/pp_stage.py, Megatron's
                # _allreduce_embedding_grads) needs the whole step's full gradient before the DP reduction.
                per_mb = per_micro_batch_reduction(spec, first, last)
                if dpcp > 1 and (idx == last_b[c] or per_mb):
                    dp_ops.setdefault(s, []).extend(_buckets(b, s, c, layers, first, last, main,
                                                             mb if per_mb else -1))
            main_compute.setdefault(s, []).append(main)

    for op, kind, mb, j in recvs:                                  # cross-stage edges: send -> matching recv
        b.edge(sends[(kind, mb, j)], op)
    _optimizer(b, pp, dp_ops, stage_chunks, last_v, v)
    _stream_order(b)
    return Plan(spec=spec, mesh=mesh, op_list=b.ops, edges=b.edges, schedule=sched, stage_chunks=stage_chunks,
                programs=b.programs)


def per_micro_batch_reduction(spec, first: bool, last: bool) -> bool:
    """Whether a chunk (first/last: it holds the first/last virtual stage) reduce-scatters its gradients after
    every micro-batch's backward (else once per step, after its last): ZeRO-2 always, ZeRO-3 without PP; never the
    chunk holding a tied embedding copy under PP (the tied sum needs the step's full gradient). The executor
    (executor/dp.py every_micro_batch, set by executor/pp_stage.py) and simulator/memory.py follow this."""
    p = spec.plan
    if p.pp > 1 and spec.model.tied_embeddings and (first or last):
        return False
    return p.zero == 2 or (p.zero == 3 and p.pp == 1)


def _buckets(b: _Builder, s: int, c: int, layers: range, first: bool, last: bool, backward: int,
             microbatch: int = -1) -> list[int]:
    """DP gradient buckets of one chunk, produced by `backward`, reduced in reverse layer order. `microbatch` is
    -1 when they reduce the whole step's accumulated gradients."""
    sh, par = b.sh, b.spec.plan
    # The executor's units (buckets closed at parameter boundaries, or ZeRO-3's layers and root), each padded to
    # a multiple of dp·cp: the bytes on the wire (spec/units.py), grouped into at most MAX_BUCKET_OPS ops.
    units = [u * sh.gb for u in sh.dp_units(layers, first, last)]
    n_buckets = len(units)
    n_ops = min(n_buckets, MAX_BUCKET_OPS)
    kind = OpKind.DP_ALLREDUCE if par.zero == 0 else OpKind.DP_REDUCESCATTER
    out, lo = [], 0
    for k in range(n_ops):
        count = n_buckets // n_ops + (1 if k < n_buckets % n_ops else 0)
        op = b.collective(s, kind, count, sum(units[lo:lo + count]) / count, chunk=c, microbatch=microbatch,
                          layers=layers, bucket=k)
        lo += count
        # The k-th group of buckets is full once the backward has produced (k+1)/n_ops of the chunk's grads.
        b.edge(backward, op, frac=(k + 1) / n_ops)
        out.append(op)
    return out


def _optimizer(b: _Builder, pp: int, dp_ops: dict[int, list[int]], stage_chunks, last_v: int, v: int) -> None:
    sh, par, train = b.sh, b.spec.plan, b.spec.training
    opt_ids = []
    for s in range(pp):
        params = sum(sh.chunk_params(r, c * pp + s == 0, c * pp + s == last_v) for c, r in enumerate(stage_chunks[s]))
        shard = sh.dpcp if par.zero >= 1 else 1
        mem = params / shard * (OPT_STATE_BYTES[train.optimizer] + sh.gb)
        op = b.add(s, OpKind.OPTIMIZER, "compute", mem_bytes=mem)
        prog = b.programs[class_name(s)]
        last_compute = [i for i in prog[:-1] if b.ops[i].stream == "compute"][-1]
        b.edge(last_compute, op)                                  # after this stage's last compute op
        opt_ids.append(op)
        if par.zero in (1, 2) and sh.dpcp > 1 and not par.overlap_param_gather:   # distributed optimizer:
            # gather the updated params (with overlap_param_gather: at the next forward, see compile_plan)
            # one call per unit of every chunk, padded (executor/dp.py gather_params; Megatron per bucket)
            units = [u for c, r in enumerate(stage_chunks[s]) for u in sh.dp_units(r, c * pp + s == 0,
                                                                                  c * pp + s == last_v)]
            g = b.collective(s, OpKind.ZERO_ALLGATHER, len(units), sum(units) * sh.pb / len(units))
            b.edge(op, g)
    # Gradient clipping needs the global norm over all stages (Megatron-LM optimizer/clip_grads.py all-reduces it
    # over the model-parallel group): with clipping, each stage's optimizer waits for every stage's reduction.
    last_dp = [ids[-1] for ids in dp_ops.values()]
    for s, op in enumerate(opt_ids):
        for u in dp_ops.get(s, []) + (last_dp if train.grad_clip > 0 else []):
            b.edge(u, op)


def _stream_order(b: _Builder) -> None:
    """Ops of one rank class on one stream run in program order (one CUDA stream = one in-order queue)."""
    for ids in b.programs.values():
        last: dict[str, int] = {}
        for i in ids:
            st = b.ops[i].stream
            if st in last:
                b.edge(last[st], i)
            last[st] = i
