"""One rank's pipeline stage with everything the training loop needs: its model chunks (part 1's `Decoder`, one
per virtual stage, context-parallel when cp > 1), one DP/ZeRO wrapper per chunk, the pipeline runner, the tied
embedding's gradient sync, and a DataParallel-like facade (grad_shards, param_shards, masks, norm_groups,
gather_params, zero_grad) so the optimizer code runs unchanged over all chunks.

Where the plan's non-pipeline ops land (`Stage.step`):
- the chunk's *last* backward of the step runs with its DP hooks armed (DataParallel.start_micro_batch(k, n)), so
  its gradient buckets are reduced while that backward proceeds, as the plan's edge "DP bucket <- the chunk's last
  backward" says;
- `dp_allreduce` / `dp_reducescatter` of chunk c waits for chunk c's buckets (one DataParallel per model chunk, as
  Megatron keeps one DDP buffer per chunk, so chunk c's reduction does not wait for the other chunks' backwards);
- `optimizer`: the caller's optimizer step, after the tied-embedding gradient sum (below);
- `zero_allgather`: the caller's parameter gather.
Tied embeddings with pp > 1 (Megatron-LM core/distributed/finalize_model_grads.py, `_allreduce_embedding_grads`):
the first stage's input embedding and the last stage's LM head are two copies of one weight; their accumulated
gradients are summed over {first stage, last stage} once every backward of the step is done, before the DP
reduction of the chunk holding the copy (so the DP reduce-scatter of ZeRO >= 1 sees the summed gradient). That
chunk's DP reduction therefore runs at the `optimizer` op instead of its own `dp_*` op: doing the cross-stage sum
earlier could deadlock (the last stage would wait for the first while the first waits for the last stage's
gradients). That chunk reduces once per step under every ZeRO stage, so it takes the tied sum the same way.
ZeRO-2 reduce-scatters after every micro-batch under PP too (DeepSpeed ZeRO-2), except the chunk holding the tied
copy (above). ZeRO-3 under PP (pp > 1), the plan's rule (spec/compile.py, docs/plan_ir.md): each chunk's gradients
accumulate in full and are reduce-scattered once, on its last backward, and ZeRO-3 gathers each unit at the chunk's first
forward and keeps it until that reduction - torchtitan's FSDP under pipelining (gradient sync on the last
backward, no resharding), whose memory simulator/memory.py checks against published runs; reducing after every
micro-batch would multiply DP traffic by m. With cp only (pp = 1) they reduce after every micro-batch, as part 1's
Trainer does, and ZeRO-3's layer hooks gather around every forward and backward; the root unit (embedding, final
norm, head) is gathered before every chunk forward and every backward (no-ops while it is kept). DeepSpeed's
PipelineEngine refuses ZeRO-2 and ZeRO-3 with pipeline parallelism altogether (deepspeed/runtime/pipe/engine.py:
"ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism").
The gradient norm adds over the pp group as well, counting the tied weight once (on the first stage), like
Megatron-LM's clip_grads (which skips the shared embedding on the last stage).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
import torch.nn as nn

from .comm import Group
from .context_parallel import apply_context_parallel, shard_batch
from .cp_layout import Layout
from .dp import DataParallel
from .model import BuildCtx, Decoder
from .pipeline import (Chunk, PipelineRunner, PPAction, StepResult, decoder_chunk, embedding_group_ranks,
                       sync_tied_embedding_grad, tied_embedding_param)
from .pp_p2p import DEFAULT_TIMEOUT_S


def make_extra_groups(mesh: Any) -> dict[str, Group]:
    """The groups PP/CP need beyond the mesh dims, for this rank (`mesh`: a `loom.spec.mesh.Mesh`):
    "dp+cp" (gradient reduction: parameters are replicated over dp and cp) and "emb" (first and last pipeline
    stage of the same dp, cp, tp coordinates). Collective: every rank must call it, in the same order."""
    me = dist.get_rank()
    out: dict[str, Group] = {}
    dpcp: dict[tuple[int, int], list[int]] = {}
    for r in range(mesh.world_size):
        c = mesh.coords(r)
        dpcp.setdefault((c["pp"], c["tp"]), []).append(r)
    for name, groups in (("dp+cp", list(dpcp.values())), ("emb", embedding_group_ranks(mesh))):
        for ranks in groups:
            pg = dist.new_group(ranks) if len(ranks) > 1 else None
            if me in ranks:
                out[name] = Group(name, pg, len(ranks), ranks.index(me))
    return out


class Stage:
    """This rank's stage. `groups`: "pp", "tp", "cp", "dp+cp", "emb" (comm.Group each)."""

    def __init__(self, spec: Any, plan: Any, groups: dict[str, Group], *, cp_layout: Layout = "zigzag",
                 device: torch.device | str = "cpu", grad_dtype: torch.dtype = torch.float32,
                 act_dtype: torch.dtype = torch.float32, param_dtype: torch.dtype = torch.float32,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        """`act_dtype`: dtype of the activations and gradients sent between stages (the plan counts the
        precision's activation bytes: bf16 for bf16 training). `param_dtype`: the model's parameters and residual
        stream (dp.py: bf16 with fp32 masters under bf16 training; the Trainer passes the precision's for both)."""
        p, t, m = spec.plan, spec.training, spec.model
        self.spec, self.plan, self.groups = spec, plan, groups
        self.pp, self.tp, self.cp, self.dpcp = groups["pp"], groups["tp"], groups["cp"], groups["dp+cp"]
        self.stage, self.cp_layout = self.pp.rank, cp_layout
        ctx = BuildCtx(m, self.tp, p.sp, t.recompute, t.seed, torch.device(device),
                       params_on_host=p.zero == 3)          # ZeRO-3: only the DP shard reaches the device
        n_virtual = p.pp * len(plan.stage_chunks[self.stage])
        self.decoders: list[Decoder] = []
        for c, layers in enumerate(plan.stage_chunks[self.stage]):
            j = c * p.pp + self.stage
            d = Decoder(ctx, layers=layers, first=j == 0, last=j == n_virtual - 1)
            apply_context_parallel(d, self.cp, cp_layout, timeout_s)
            self.decoders.append(d)
        self.tied = tied_embedding_param(self.decoders) if m.tied_embeddings and p.pp > 1 else None
        # ZeRO-3 under PP reduces once per step, on each chunk's last backward, and keeps a chunk gathered from
        # its first forward to that reduction (the plan's rule, spec/compile.py: torchtitan's FSDP under
        # pipelining); ZeRO-2 reduces after every micro-batch, with or without PP (DeepSpeed ZeRO-2), except the
        # chunk holding a tied embedding copy under PP (its cross-stage sum needs the full gradient, below);
        # without PP (cp only) ZeRO-3 reduces after every micro-batch as part 1's Trainer does.
        def every_mb(d) -> bool:
            holds_tied = self.tied is not None and any(q is self.tied for q in d.parameters())
            return p.pp == 1 or (p.zero == 2 and not holds_tied)
        self.dps = [DataParallel(d, self.dpcp, self.tp, p.zero, p.bucket_MB, grad_dtype,
                                 layer_units=list(d.layers), every_micro_batch=every_mb(d),
                                 param_dtype=param_dtype) for d in self.decoders]
        self.tied_chunk = next((c for c, dp in enumerate(self.dps) if self.tied in dp.unit_of), None) \
            if self.tied is not None else None
        self._uncount_tied_copy()
        self.global_tokens = t.global_batch * m.seq_len
        s_local = m.seq_len // p.cp // (p.tp if p.sp else 1)
        self.act_shape = (s_local, t.micro_batch, m.hidden)
        self.act_dtype, self.param_dtype = act_dtype, param_dtype
        self.runner_args = (self.pp, self.act_shape, act_dtype, torch.device(device), timeout_s)

    # ---- the step ----------------------------------------------------------------------------------------------
    def step(self, program: list[Any], batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
             optimize: Callable[[], None], gather: Callable[[], None] | None = None,
             forward_ctx: Callable[[], ContextManager] = contextlib.nullcontext,
             loss_multiplier: float = 1.0,
             on_op: Callable[[Any, float, float], None] | None = None) -> StepResult:
        """Run one step of the plan's program. `batch(mb)` gives micro-batch mb's full-sequence (ids, targets) for
        this DP replica (sliced here for cp); `optimize()` steps the optimizer over `grad_shards()`;
        `forward_ctx()` wraps each chunk's forward (autocast); `loss_multiplier` scales the loss (fp16 loss
        scaling; the returned loss includes it); `on_op(op, start_s, end_s)` once per program op (the runner's)."""

        def local_batch(mb: int):
            ids, tgt = batch(mb)
            return shard_batch(ids, tgt, self.cp, self.cp_layout)

        chunks: list[Chunk] = []
        for d, dp in zip(self.decoders, self.dps):
            ch = decoder_chunk(d, local_batch, loss_multiplier / self.global_tokens)

            def run(x, mb, run=ch.run, last=ch.last, dp=dp):
                if dp.zero == 3:                             # embedding, final norm, head: gathered per forward
                    dp.gather_root()
                # Stage boundaries carry `act_dtype` (bf16 like Megatron's pipeline messages; the Trainer's residual
                # stream is already in it); the gradient travels in it as well.
                with forward_ctx():
                    y = run(None if x is None else x.to(self.param_dtype), mb)
                return y if last else y.to(self.act_dtype)
            chunks.append(Chunk(run, ch.first, ch.last))
        runner = PipelineRunner(chunks, *self.runner_args)
        reduced: set[int] = set()
        gathered = False

        def before_backward(a: PPAction, k: int, n: int) -> None:
            # DataParallel's accumulation protocol, per chunk: the k-th of n backwards; buckets are reduced from
            # the hooks of the last one (overlapping it), earlier ones only accumulate.
            # The chunk holding a tied copy never arms its hooks: it is reduced at the optimizer op.
            self.dps[a.chunk].start_micro_batch(k, n + 1 if a.chunk == self.tied_chunk else n)
            if self.dps[a.chunk].zero == 3:              # the root unit was freed after the last backward
                self.dps[a.chunk].gather_root()

        def on_other(op: Any) -> None:
            nonlocal gathered
            kind = op.kind.value
            if kind in ("dp_allreduce", "dp_reducescatter") and op.chunk not in reduced \
                    and op.chunk != self.tied_chunk:
                self.dps[op.chunk].finish_backward()
                reduced.add(op.chunk)
            elif kind == "optimizer":
                self._sync_tied()
                self._finish_all(reduced)
                optimize()
            elif kind == "zero_allgather" and gather is not None and not gathered:
                gather()
                gathered = True

        def after_backward(a: PPAction) -> None:
            if self.dps[a.chunk].per_micro_batch:            # reduce-scatter every micro-batch, free the full grad
                self.dps[a.chunk].finish_backward()

        res = runner.step(program, on_other=on_other, before_backward=before_backward,
                          after_backward=after_backward, on_op=on_op)
        if gather is not None and not gathered and self.zero in (1, 2) and self.dpcp.active:
            gather()           # a program without a zero_allgather op (hand-written ones in tests)
        return res

    def _finish_all(self, reduced: set[int]) -> None:
        for c, dp in enumerate(self.dps):                    # a plan without DP ops (dp = cp = 1) still reduces SP
            if c not in reduced:
                dp.sync_now = True
                dp.finish_backward()
                reduced.add(c)

    def _sync_tied(self) -> None:
        if self.tied is None:
            return
        dp = self.dps[self.tied_chunk]
        u = dp.unit_of[self.tied]
        off = u.offsets[dp.index_in_unit[self.tied]]
        sync_tied_embedding_grad(u.grad[off:off + self.tied.numel()], self.groups["emb"])

    def _uncount_tied_copy(self) -> None:
        """The last stage's copy of the tied embedding is not counted in the gradient norm (the first's is)."""
        if self.tied is None or not any(d.last for d in self.decoders):
            return
        dp = self.dps[self.tied_chunk]
        u = dp.unit_of[self.tied]
        lo = u.offsets[dp.index_in_unit[self.tied]]
        hi = lo + self.tied.numel()
        _, counts = dp.masks()
        cnt = counts[next(i for i, x in enumerate(dp.units) if x is u)]    # identity: Unit holds tensors
        base = dp.dp.rank * (u.numel // dp.dp.size) if dp.zero >= 1 else 0
        a, b = max(lo - base, 0), min(hi - base, cnt.numel())
        if a < b:
            cnt[a:b] = False

    # ---- DataParallel-like facade over the chunks -------------------------------------------------------------
    @property
    def zero(self) -> int:
        return self.dps[0].zero

    @property
    def units(self) -> list:
        return [u for dp in self.dps for u in dp.units]

    def grad_shards(self) -> list[torch.Tensor]:
        return [g for dp in self.dps for g in dp.grad_shards()]

    def param_shards(self) -> list[torch.Tensor]:
        return [p for dp in self.dps for p in dp.param_shards()]

    def masks(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        decay, count = [], []
        for dp in self.dps:
            d, c = dp.masks()
            decay += d
            count += c
        return decay, count

    def norm_groups(self) -> list[Group]:
        return self.dps[0].norm_groups() + [self.pp]

    def refresh_params(self) -> None:
        for dp in self.dps:
            dp.refresh_params()

    def gather_params(self) -> None:
        for dp in self.dps:
            dp.gather_params()

    def zero_grad(self) -> None:
        for dp in self.dps:
            dp.zero_grad()

    def modules(self) -> nn.ModuleList:
        return nn.ModuleList(self.decoders)
