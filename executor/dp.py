"""Data parallelism and ZeRO over flat parameter buffers.

Parameters are grouped into units, each backed by one flat parameter buffer (the parameters become views into it)
and one flat gradient buffer, padded to a multiple of dp so every unit splits into dp equal shards — this is how
parameter sizes that do not divide dp are handled. Rank r of the DP group owns shard r of every unit. A unit and
how it is built: executor/dp_unit.py; this module groups, reduces, gathers and frees them.

- zero 0 (DDP): units are gradient buckets of ~bucket_MB in reverse registration order (the order the backward
  produces gradients; PyTorch DDP's reducer.cpp does the same); a bucket's all-reduce is issued asynchronously
  from a post-accumulate-grad hook as soon as its last gradient lands, overlapping the rest of the backward.
- zero 1: the bucket's gradients are reduce-scattered (half the bytes of an all-reduce) in place, into this
  rank's own shard of the full gradient buffer (no separate shard copy: Megatron-LM's distributed optimizer,
  core/distributed/param_and_grad_buffer.py, reduce-scatters each bucket of its grad buffer into the bucket's own
  shard); the optimizer updates only the owned shard (its states exist only for it), then each unit's parameters
  are all-gathered (Rajbhandari et al. 2020 §5.1, P_os; the plan IR's choice too). Memory: the full buffer.
- zero 2: gradients are reduce-scattered after every micro-batch's backward, bucket by bucket, into a shard
  accumulator (grad_dtype); a unit's full gradient buffer is allocated when its first gradient lands and freed
  once its reduce-scatter is done, and a unit's reduction waits for the previous unit's, so at most about two
  buckets of full gradients exist at once (P_os+g; DeepSpeed ZeRO-2, runtime/zero/stage_1_and_2.py: the
  reduce_bucket_size "ipg" buckets are reduced as the backward fills them and only the partition is kept, under
  gradient accumulation every micro-batch). Memory: the shard, plus ~2 buckets during the backward.
- zero 3: units are layers (plus one root unit: embedding, final norm, head). A layer's parameters are all-gathered
  before its forward and freed after it, gathered again when its output's gradient arrives, and freed again as
  soon as its last gradient has landed and its reduce-scatter is issued (P_os+g+p; FSDP's storage-resize scheme,
  resharding after each layer's backward). Prefetch: when
  layer i's gather is done, layer i+1's (forward) or i-1's (backward) is issued asynchronously, so it travels
  while layer i computes (FSDP's forward_prefetch / BACKWARD_PRE; the plan's one-op-ahead gather edge); at most
  one unit beyond the one in use is in flight or gathered early.
Parameter precision (`param_dtype`, the training precision; Megatron-LM's mixed-precision layout): the model's
parameters are views of the unit's flat buffer in that dtype (bf16/fp16: 2 bytes each, so the linears read them
directly: autocast makes no weight copies to save for the backward), and the optimizer updates an fp32 master of
what this rank owns (`shard_param`: the whole unit under ZeRO-0 or on one rank, its shard under ZeRO >= 1), held
apart from the parameters (Megatron's Float16Module + its optimizer's fp32 main params; ZeRO §3.1's K = 12 bytes
of master, momentum and variance). After each step the masters are rounded into the parameters: a local copy
(`refresh_params`: ZeRO-0, one rank, ZeRO-3's persistent low-precision shard) or the ZeRO-1/2 all-gather of the
rounded shards (`gather_params`, the plan's zero_allgather: Megatron's distributed optimizer gathers its bf16
parameters). ZeRO-3 keeps this rank's shard in the parameter dtype beside the fp32 master and gathers it
(DeepSpeed ZeRO-3's fp16/bf16 partitions). In fp32 the parameters are the masters (no extra copy). Gradients
arrive in the parameter dtype (autograd's) and accumulate into `grad_dtype` buffers (Megatron's main_grad).
Gradient accumulation: zero 0-1 communicate only after the last micro-batch (DDP's no_sync()); zero 2-3 after
each, accumulating into the reduced shard - unless `every_micro_batch=False`: then they accumulate full gradients
and reduce once, after the last micro-batch, and zero 3 keeps each unit gathered from its first forward until
that reduction (the plan's rule for ZeRO-3 under pipeline parallelism, torchtitan's FSDP under PP; for ZeRO-2
only the pipeline chunk holding a tied embedding copy, whose cross-stage gradient sum needs the full gradient).
The loss is normalised by the tokens of the whole global batch, so the DP reduction is a plain sum.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import comm
from .comm import Group
from .dp_unit import Unit, _alloc, _free, _mask, build_unit, counted, decays


class DataParallel:
    def __init__(self, model: nn.Module, dp: Group, tp: Group, zero: int, bucket_MB: float,
                 grad_dtype: torch.dtype = torch.float32, layer_units: list[nn.Module] | None = None,
                 every_micro_batch: bool = True, param_dtype: torch.dtype = torch.float32, prefetch: bool = True):
        self.model, self.dp, self.tp, self.zero = model, dp, tp, zero
        # zero >= 2: reduce-scatter after every micro-batch (and ZeRO-3: re-gather around every forward/backward);
        # False: once per step, keeping full gradients (and ZeRO-3 parameters) for the step (spec/compile.py, PP).
        self.per_micro_batch = zero >= 2 and every_micro_batch
        # zero >= 2 over more than one rank: a unit's full gradient buffer is allocated when its first gradient
        # lands and freed after its reduction; only the shard accumulator persists
        self.transient_grads = zero >= 2 and dp.active
        self.grad_dtype = grad_dtype
        self.param_dtype = param_dtype                  # the model's parameters, and what ZeRO gathers move
        self.lowp = param_dtype != torch.float32         # the fp32 masters are then held apart
        self.prefetch = prefetch
        self.sync_now = True
        params = list(dict.fromkeys(model.parameters()))
        if zero == 3:
            layer_units = layer_units or []
            in_layer = {p for m in layer_units for p in m.parameters()}
            groups = [list(m.parameters()) for m in reversed(layer_units)]
            groups.append([p for p in params if p not in in_layer])
        else:
            # Backward order: reverse registration (last layers' grads come first), except that the LM head's own
            # weight (registered first, as the Decoder's own parameter) gets its gradient first of all: it goes
            # into the first bucket, else the last bucket's buffer would be held through the whole backward
            # (spec/units.py chunk_units groups the same way)
            head = getattr(model, "head_weight", None)
            embed = getattr(getattr(model, "embed", None), "weight", None)
            if head is not None and head is not embed:
                params = [p for p in params if p is not head] + [head]
            groups, cur, cur_bytes = [], [], 0
            for p in reversed(params):
                cur.append(p)
                cur_bytes += p.numel() * grad_dtype.itemsize
                if cur_bytes >= bucket_MB * 2**20:
                    groups.append(cur)
                    cur, cur_bytes = [], 0
            if cur:
                groups.append(cur)
        self.units = [self._make_unit(g, i) for i, g in enumerate(groups) if g]
        self.unit_of = {p: u for u in self.units for p in u.params}
        self.index_in_unit = {p: i for u in self.units for i, p in enumerate(u.params)}
        for p in self.unit_of:
            p.register_post_accumulate_grad_hook(self._on_grad)
        if zero == 3:
            for m, u in zip(reversed(layer_units), self.units):
                m.register_forward_pre_hook(lambda mod, args, u=u: self._before_forward(u))
                m.register_forward_hook(lambda mod, args, out, u=u: self._after_forward(u, out))
            self.root = self.units[-1]
            for u in self.units:
                self._release(u)

    # ---- construction ------------------------------------------------------------------------------------
    def _make_unit(self, params: list[nn.Parameter], index: int) -> Unit:
        return build_unit(params, index, dp=self.dp, tp_rank=self.tp.rank, zero=self.zero,
                          param_dtype=self.param_dtype, grad_dtype=self.grad_dtype,
                          transient_grads=self.transient_grads, device=getattr(self.model, "loom_device", None))

    # ---- zero 3 parameter gathering ----------------------------------------------------------------------
    def _issue(self, u: Unit) -> None:
        """Start gathering u's parameters into its buffer (async); `_gather` waits for it."""
        _alloc(u.flat)
        tag = comm.LOG.tag
        comm.LOG.tag = f"{tag}>zero_allgather:u{u.index}"
        src = u.shard_lowp if u.shard_lowp is not None else u.shard_param      # the parameter dtype's shard
        u.inflight = comm.all_gather(u.flat, src, self.dp, async_op=True)
        comm.LOG.tag = tag

    def _gather(self, u: Unit) -> None:
        if u.gathered:
            return
        if u.inflight is None:
            self._issue(u)
        u.inflight.wait()
        u.inflight = None
        u.gathered = True

    def _prefetch(self, index: int) -> None:
        """Issue the gather of layer unit `index` (if it is one and is neither gathered nor in flight)."""
        if self.prefetch and 0 <= index < len(self.units) - 1:
            u = self.units[index]
            if not u.gathered and u.inflight is None:
                self._issue(u)

    def _release(self, u: Unit) -> None:
        if self.zero == 3 and self.dp.active and (u.gathered or u.inflight is not None):
            if u.inflight is not None:                  # never free a buffer a gather still writes
                self._gather(u)
            _free(u.flat)
            u.gathered = False

    def _before_forward(self, u: Unit) -> None:
        self._gather(u)
        if not u.in_backward:                           # not a recompute: prefetch the next layer (units are
            self._prefetch(u.index - 1)                 # in reverse layer order)

    def _after_forward(self, u: Unit, out: torch.Tensor) -> None:
        if u.in_backward or not self.per_micro_batch:      # a recompute inside the backward, or kept for the step
            return
        self._release(u)
        if out.requires_grad:
            out.register_hook(lambda g, u=u: self._before_backward(u))

    def _before_backward(self, u: Unit) -> None:
        u.in_backward = True
        self._gather(u)
        self._prefetch(u.index + 1)                     # the previous layer's backward comes next

    def gather_root(self) -> None:
        if self.zero == 3:
            self._gather(self.root)
            self.root.in_backward = True                    # root stays gathered until its grads are reduced

    # ---- gradients ---------------------------------------------------------------------------------------
    def start_micro_batch(self, micro: int, n_micro: int) -> None:
        """Call before each micro-batch's backward: communicate only on the last (zero 0, 1: DDP's no_sync), or
        after every micro-batch (zero 2, 3: gradients accumulate in the reduced shard, as DeepSpeed does; a unit's
        full buffer lives from its first gradient to its reduction)."""
        self.sync_now = self.per_micro_batch or micro == n_micro - 1
        for u in self.units:
            u.ready, u.launched = 0, False
            if not self.transient_grads and (micro == 0 or self.per_micro_batch):
                u.grad.zero_()

    def zero_grad(self) -> None:
        """After a step: clear the reduced shards (the full buffers are zeroed by the next first micro-batch)."""
        for u in self.units:
            if u.shard_grad is not None:
                u.shard_grad.zero_()

    def _ensure_grad(self, u: Unit) -> None:
        """zero >= 2: allocate (zeroed) a unit's full gradient buffer if it was freed after its last reduction."""
        if self.transient_grads and u.grad.untyped_storage().size() == 0:
            self._drain(u)           # a gradient can land before the previous unit's last one: finish older
            _alloc(u.grad)           # reductions first, so at most two full buffers exist (one filling, one
            u.grad.zero_()           # reducing; DeepSpeed alternates two ipg buffers likewise)

    def _drain(self, u: Unit) -> None:
        for v in self.units:
            if v is not u and v.pending:
                self._complete(v)

    def _on_grad(self, p: nn.Parameter) -> None:
        u = self.unit_of[p]
        i = self.index_in_unit[p]
        self._ensure_grad(u)
        u.grad[u.offsets[i]:u.offsets[i] + p.numel()].add_(p.grad.reshape(-1))
        p.grad = None
        u.ready += 1
        if u.ready == len(u.params) and self.sync_now:
            self._launch(u)

    def _launch(self, u: Unit) -> None:
        u.launched = True
        self._ensure_grad(u)                                # a unit none of whose parameters got a gradient
        if self.transient_grads:
            # bucket-sized full gradients (DeepSpeed's ipg buckets): finish the units launched before this one
            # (their buffers are freed) before this one's reduction starts
            self._drain(u)
        tag = comm.LOG.tag
        comm.LOG.tag = f"{tag}>sp_grad_allreduce:u{u.index}"
        if u.sp_params:                                     # SP partial sums over the sequence shards: one call
            parts = [u.grad[off:off + k] for off, k in u.sp_params]
            packed = torch.cat(parts)
            comm.all_reduce(packed, self.tp)
            for dst, src in zip(parts, packed.split([k for _, k in u.sp_params])):
                dst.copy_(src)
        comm.LOG.tag = f"{tag}>" + ("dp_allreduce" if self.zero == 0 else "dp_reducescatter") + f":u{u.index}"
        if self.zero == 0:
            u.pending.append(comm.all_reduce(u.grad, self.dp, async_op=True))
        else:
            # in place: this rank's shard of the buffer receives the sum (NCCL and gloo allow the output to be
            # the input's own rank-th chunk); zero 1's shard_grad is that very view
            per = u.numel // self.dp.size
            mine = u.grad[self.dp.rank * per:(self.dp.rank + 1) * per]
            u.pending.append(comm.reduce_scatter(mine, u.grad, self.dp, async_op=True))
        comm.LOG.tag = tag
        if self.zero == 3 and self.per_micro_batch and u is not self.root:
            # every gradient of the layer has landed, so its backward no longer reads the parameters: free them
            # now (FSDP reshards after each layer's backward), not after the whole backward
            self._release(u)

    def _complete(self, u: Unit) -> None:
        """Wait for u's reductions; zero >= 2: add the reduced shard into the accumulator, free the full buffer."""
        for work in u.pending:
            work.wait()
        u.pending.clear()
        if self.transient_grads:
            per = u.numel // self.dp.size
            u.shard_grad.add_(u.grad[self.dp.rank * per:(self.dp.rank + 1) * per])
            _free(u.grad)

    def finish_backward(self) -> None:
        """After a micro-batch's backward: flush units whose hooks did not all fire, wait, post-process."""
        if not self.sync_now:
            return
        for u in self.units:
            if not u.launched:
                self._launch(u)
        for u in self.units:
            if u.pending:
                self._complete(u)
            if self.zero == 3:
                u.in_backward = False
                self._release(u)

    def grad_shards(self) -> list[torch.Tensor]:
        """Each unit's reduced gradient for the parameters this rank updates (fp32)."""
        g = [u.shard_grad if self.zero >= 1 else u.grad for u in self.units]
        return [x if x.dtype == torch.float32 else x.float() for x in g]

    def param_shards(self) -> list[torch.Tensor]:
        """The fp32 masters the optimizer updates, aligned with grad_shards()."""
        return [u.shard_param for u in self.units]

    def masks(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(decay, count) masks aligned with param_shards()."""
        if self.zero >= 1:
            return [u.decay for u in self.units], [u.count for u in self.units]
        return self._full_masks

    @property
    def _full_masks(self):
        if not hasattr(self, "_fm"):
            whole = [slice(0, u.numel) for u in self.units]
            self._fm = ([_mask(u.params, u.offsets, w, decays).to(u.flat.device) for u, w in zip(self.units, whole)],
                        [_mask(u.params, u.offsets, w, lambda p: counted(p, self.tp.rank)).to(u.flat.device)
                         for u, w in zip(self.units, whole)])
        return self._fm

    def norm_groups(self) -> list[Group]:
        """Groups over which squared-gradient sums add up to the global norm: TP always; DP when sharded."""
        return [self.tp] + ([self.dp] if self.zero >= 1 else [])

    def refresh_params(self) -> None:
        """After the optimizer step: round the updated fp32 masters into the parameters where no collective is
        needed (zero 0 and any stage on one rank: the whole unit; zero 3: the persistent low-precision shard its
        gathers read). Nothing to do in fp32, where the parameters are the masters."""
        if not self.lowp:
            return
        for u in self.units:
            if u.shard_lowp is not None:
                u.shard_lowp.copy_(u.shard_param)
            elif self.zero == 0 or not self.dp.active:
                u.flat.copy_(u.shard_param)

    def gather_params(self) -> None:
        """After the optimizer step (zero 1, 2 over >1 rank): every rank gets the updated full parameters, in the
        parameter dtype (bf16/fp16: the rounded masters, the plan's 2 bytes per element on the wire)."""
        if self.zero in (1, 2) and self.dp.active:
            for u in self.units:
                tag = comm.LOG.tag
                comm.LOG.tag = f"{tag}>zero_allgather:u{u.index}"
                comm.all_gather(u.flat, u.shard_param.to(self.param_dtype, copy=True), self.dp)
                comm.LOG.tag = tag
