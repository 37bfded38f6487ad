"""Data parallelism and ZeRO in the plan: the gradient reductions of each chunk (DP buckets, when they run:
`per_micro_batch_reduction`), the ZeRO-3 parameter gathers, the ZeRO-1/2 parameter gathers (after the optimizer, or
before the first forward with `overlap_param_gather`) and the optimizer step that waits for the reductions.
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
"""
from __future__ import annotations

from .compile_builder import _Builder
from .compile_compute import ChunkStep
from .compile_sizes import OPT_STATE_BYTES
from .plan import OpKind, class_name

MAX_BUCKET_OPS = 8          # DP buckets per chunk are grouped into at most this many ops (each carries `count`)


def zero3_gathers(b: _Builder, st: ChunkStep, prev_compute: int | None) -> tuple[int | None, int | None]:
    """The ZeRO-3 gathers before a compute action, as (root, layers) (None where there is none); `prev_compute` is
    the stage's previous FORWARD/BACKWARD op, which the gathers may not start before (prefetch one op ahead).
    ZeRO-3 without PP (executor/dp.py; FSDP reshard_after_forward): a chunk's layers are gathered one
    call per layer before every forward and again before every backward; the root unit (embedding, final
    norm, LM head: the first/last virtual stage's parameters outside the layers) once per micro-batch,
    before its forward, kept until that micro-batch's backward has reduced it. With PP the gathered
    chunk stays for the whole step (torchtitan turns resharding off under PP, else every micro-batch
    would gather again), so only the first forward of each chunk gathers, root and layers."""
    sh, par = b.sh, b.spec.plan
    s, n, first, last, common = st.stage, st.n, st.first, st.last, st.common
    zero3 = root = None
    if par.zero == 3 and sh.dpcp > 1 and (par.pp == 1 or st.first_forward):
        if st.forward and (first or last):
            root = b.collective(s, OpKind.ZERO_ALLGATHER, 1,
                                sum(sh.dp_units(range(0), first, last)) * sh.pb, **common)
        if n:                                              # one unit per layer, each padded
            zero3 = b.collective(s, OpKind.ZERO_ALLGATHER, n,
                                 sh.dp_units(range(1), False, False)[0] * sh.pb, **common)
        for g in (root, zero3):
            if g is not None and prev_compute is not None:
                b.edge(prev_compute, g, frac=0.0)          # prefetch: one op ahead, no further
    return root, zero3


def param_gather(b: _Builder, st: ChunkStep) -> int | None:
    """With `overlap_param_gather`, the ZeRO-1/2 gather of a chunk's updated parameters before its first forward.
    overlap_param_gather (ZeRO-1/2, Megatron's distributed optimizer): the updated parameters are
    all-gathered at the next step's forward instead of after the optimizer - in the steady state, at the
    start of this step, before each chunk's first forward. Megatron-LM (core/distributed/
    distributed_data_parallel.py forward pre-hooks; param_and_grad_buffer.py finish_param_sync): a
    module waits for its bucket's gather, which then dispatches the next bucket's, so the forward runs
    one bucket behind the gather (pipelined edge, 1/units) and the first bucket is exposed. Without
    interleaving the first bucket is dispatched by the forward's pre-hook (after its input arrived);
    with it Megatron's align_param_gather dispatches every chunk's gathers at the step's start, in
    bucket order (reverse layer order), so a chunk's first forward waits for its whole gather."""
    sh, par = b.sh, b.spec.plan
    if not (par.overlap_param_gather and par.zero in (1, 2) and sh.dpcp > 1 and st.first_forward):
        return None
    units = sh.dp_units(st.layers, st.first, st.last)
    pgather = b.collective(st.stage, OpKind.ZERO_ALLGATHER, len(units), sum(units) * sh.pb / len(units),
                           **st.common)
    for u in (st.before if b.v == 1 else []):
        b.edge(u, pgather)
    return pgather


def gradient_reduction(b: _Builder, st: ChunkStep, backward: int, last_backward: bool) -> list[int] | None:
    """The DP bucket ops a chunk's backward starts (None when this backward does not reduce); `last_backward`:
    the chunk's last backward of the step.
    ZeRO-0/1 accumulate full gradients and reduce once per step, from the chunk's last backward (DDP
    no_sync; Megatron's accumulation buffer, reduce-scattered in place by its distributed optimizer).
    ZeRO-2/3 keep only a gradient shard, so they reduce-scatter after every micro-batch's backward
    (DeepSpeed ZeRO-2, runtime/zero/stage_1_and_2.py: buckets reduced as the backward fills them,
    every micro-batch under accumulation; FSDP without no_sync). ZeRO-2 does so under PP too; ZeRO-3
    under PP reduces once per step, on the chunk's last backward: torchtitan's pipeline schedules
    sync FSDP gradients only on the last backward (torch.distributed.pipelining
    stage.backward_maybe_with_nosync) and keep the stage unsharded, whose memory simulator/memory.py
    models and checks against published torchtitan runs. Under PP with tied embeddings the chunk
    holding the table (first or last virtual stage) reduces once per step as well, at any ZeRO stage:
    the cross-stage sum of the tied gradient (executor/pp_stage.py, Megatron's
    _allreduce_embedding_grads) needs the whole step's full gradient before the DP reduction."""
    per_mb = per_micro_batch_reduction(b.spec, st.first, st.last)
    if b.sh.dpcp > 1 and (last_backward or per_mb):
        return _buckets(b, st.stage, st.chunk, st.layers, st.first, st.last, backward,
                        st.microbatch if per_mb else -1)
    return None


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
            # gather the updated params (with overlap_param_gather: at the next forward, see param_gather)
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
