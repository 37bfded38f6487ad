"""Tensor and sequence parallelism: the communication operators and the sharded layers.

Activations are sequence-first, (seq, batch, hidden), as in Megatron-LM, so sequence-parallel gathers and scatters
work on dim 0 (contiguous chunks).

The four conjugate operators (Shoeybi et al. 2019 §3, Fig. 3; Korthikanti et al. 2022 §4.2.2, Fig. 5):
  f  = copy_to_tp:        forward identity,          backward all-reduce   (enters a TP region, no SP)
  g  = reduce_from_tp:    forward all-reduce,        backward identity     (leaves a TP region, no SP)
  g' = gather_from_sp:    forward all-gather(seq),   backward reduce-scatter(seq)   (enters, with SP)
  f' = scatter_to_sp:     forward reduce-scatter(seq), backward all-gather(seq)     (leaves, with SP)
With SP the column-parallel linears after g' save the local shard of their input and all-gather it once more in the
backward (Korthikanti et al. 2022 §4.2.2): `column_parallel_linear`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import comm
from .comm import Group


def _gather_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] * group.size, *x.shape[1:]))
    comm.all_gather(out, x, group)
    return out


def _scatter_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // group.size, *x.shape[1:]))
    comm.reduce_scatter(out, x, group)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        comm.all_reduce(g, ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        comm.all_reduce(x, group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _scatter_seq(g, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _scatter_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_seq(g, ctx.group), None


def enter_tp(x: torch.Tensor, group: Group, sp: bool) -> torch.Tensor:
    """Into a column-parallel region: g' (all-gather the sequence) with SP, else f.

    With SP the gathered tensor carries its shard (`_SPInput`): the column-parallel linears that read it save the
    shard, not the gathered tensor, and gather it again in the backward (`column_parallel_linear`)."""
    if not group.active:
        return x
    if not sp:
        return _CopyToTP.apply(x, group)
    full = _GatherFromSP.apply(x, group)
    full.loom_sp = (x.detach(), _SPInput(group))      # dies with `full` after the forward: ctx keeps no tensor
    return full


def leave_tp(x: torch.Tensor, group: Group, sp: bool) -> torch.Tensor:
    """Out of a row-parallel region: f' (reduce-scatter over the sequence) with SP, else g."""
    if not group.active:
        return x
    return _ScatterToSP.apply(x, group) if sp else _ReduceFromTP.apply(x, group)


# ---- sequence parallel: the column-parallel linears keep the shard -------------------------------------------------
class _SPInput:
    """The backward's re-gathered copy of an SP-gathered activation, shared by the linears that read it.

    Korthikanti et al. 2022 §4.2.2 (and Megatron-LM's LinearWithGradAccumulationAndAsyncCommunication with
    sequence_parallel): the linears after g' keep only this rank's shard of their input (s/t·b·h) and all-gather it
    again in the backward for the weight gradient. Several linears read one gathered input (Q, K, V; gate, up):
    one re-gather serves them all, as Megatron's fused QKV / FC1 GEMM does, and is dropped after the last one.
    Holds no tensor between forward and backward (the shard is saved by autograd, where measure.py sees it)."""

    def __init__(self, group: Group):
        self.group = group
        self.readers = 0                   # column-parallel linears that saved the shard (counted in the forward)
        self._full: torch.Tensor | None = None
        self._left = 0

    def gathered(self, shard: torch.Tensor) -> torch.Tensor:
        """The full-sequence input again from the saved `shard` (as autograd unpacked it: a recompute may have
        rebuilt it); all-gathered by the first reader's backward, dropped after the last reader's."""
        if self._full is None:
            self._full, self._left = _gather_seq(shard, self.group), self.readers
        full = self._full
        self._left -= 1
        if self._left == 0:
            self._full = None
        return full


class _LinearKeepingShard(torch.autograd.Function):
    """y = full·Wᵀ + b, where `full` is the SP all-gather of `shard`: saves the shard (and W), not `full`. The
    backward's GEMMs run in the gradient's dtype, as an autocast linear's do (model.amp_cast already gives the
    shard the autocast dtype)."""

    @staticmethod
    def forward(ctx, full, shard, weight, bias, sp_input: _SPInput):
        ctx.save_for_backward(shard, weight)
        ctx.sp_input, ctx.in_dtype, ctx.has_bias = sp_input, full.dtype, bias is not None
        return F.linear(full, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        shard, weight = ctx.saved_tensors
        full = ctx.sp_input.gathered(shard).to(dy.dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dw = dy2.t().mm(full.reshape(-1, full.shape[-1])).to(weight.dtype)
        db = dy2.sum(0).to(weight.dtype) if ctx.has_bias else None
        return dy.matmul(weight.to(dy.dtype)).to(ctx.in_dtype), None, dw, db, None


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """F.linear for a column-parallel weight; an SP-gathered input (from enter_tp) is saved as its shard."""
    sp = getattr(x, "loom_sp", None)
    if sp is None or not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    shard, sp_input = sp
    sp_input.readers += 1
    return _LinearKeepingShard.apply(x, shard, weight, bias, sp_input)


# ---- parameter metadata ----------------------------------------------------------------------------------------
def param(t: torch.Tensor) -> nn.Parameter:
    """nn.Parameter(t), keeping t's initialiser (`loom_init`: a meta tensor built by model.BuildCtx under
    ZeRO-3, whose values executor/dp.py computes shard by shard)."""
    p = nn.Parameter(t)
    if hasattr(t, "loom_init"):
        p.loom_init = t.loom_init
    return p


def mark(p: nn.Parameter, *, tp_split: bool, sp_grad: bool = False, decay: bool = True, tp_dim: int = 0
         ) -> nn.Parameter:
    """Annotate a parameter for the DP/ZeRO and clipping code.

    tp_split: each TP rank holds a different shard (counted once per rank in the grad norm);
    otherwise the parameter is replicated over TP (counted once, on TP rank 0).
    sp_grad: under SP the parameter sees only this rank's sequence shard, so its gradient is a partial sum that
    must be all-reduced over TP (Korthikanti et al. 2022 §4.2.2; Megatron's allreduce_sequence_parallel_grads).
    decay: AdamW weight decay applies (not to norms and biases, as in Megatron-LM and GPT-3)."""
    p.loom_tp_split = tp_split
    p.loom_tp_dim = tp_dim               # the dim the full tensor is split along (for gathering it back)
    p.loom_sp_grad = sp_grad
    p.loom_decay = decay
    return p


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows over TP: each rank computes out_features / tp outputs.

    Built from this rank's shard (its rows of W and of b), never the full weight (model.BuildCtx.shard)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: Group):
        super().__init__()
        self.weight = mark(param(weight), tp_split=group.size > 1)
        self.bias = None if bias is None else mark(param(bias), tp_split=group.size > 1, decay=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_parallel_linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T (+ b after the reduction) with W split by input columns over TP; the caller reduces.

    Built from this rank's columns of W and the whole (replicated) bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: Group, sp: bool):
        super().__init__()
        self.weight = mark(param(weight), tp_split=group.size > 1, tp_dim=1)
        self.bias = None if bias is None else mark(
            param(bias), tp_split=False, sp_grad=sp and group.size > 1, decay=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary split over TP (Shoeybi et al. 2019 §3, "input embedding").

    Each rank looks up the ids in its vocab range and writes zeros elsewhere; the caller sums over TP (g, or f'
    with SP), so every rank ends with the full embedding. Built from this rank's rows of the padded table."""

    def __init__(self, weight: torch.Tensor, group: Group):
        super().__init__()
        self.group = group
        per = weight.shape[0]
        self.start, self.end = group.rank * per, (group.rank + 1) * per
        self.weight = mark(param(weight), tp_split=group.size > 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.group.active:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        return F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary over TP, without gathering them (Megatron-LM's
    tensor_parallel/cross_entropy.py): three all-reduces of (tokens,)-sized tensors instead of an all-gather of
    (tokens, vocab). Columns >= `vocab` (TP padding) are masked out."""

    @staticmethod
    def forward(ctx, logits, targets, start, vocab, group):
        # One fp32 working copy, then in place: a (tokens, vocab/tp) buffer is the largest activation of a step.
        z = logits.float() if logits.dtype != torch.float32 else logits.clone()
        local_v = z.shape[-1]
        if start + local_v > vocab:                          # TP padding columns take no probability
            col = torch.arange(start, start + local_v, device=z.device)
            z.masked_fill_(col >= vocab, float("-inf"))
        m = z.max(dim=-1).values
        comm.all_reduce(m, group, op=torch.distributed.ReduceOp.MAX)
        z.sub_(m[..., None])
        inside = (targets >= start) & (targets < start + local_v)
        tgt = (targets - start).clamp(0, local_v - 1)
        picked = z.gather(-1, tgt[..., None]).squeeze(-1).masked_fill(~inside, 0.0)
        comm.all_reduce(picked, group)
        e = z.exp_()
        s = e.sum(-1)
        comm.all_reduce(s, group)
        loss = s.log() - picked
        ctx.save_for_backward(e.div_(s[..., None]), tgt, inside)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, tgt, inside = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, tgt[..., None], -inside[..., None].to(grad.dtype))
        return grad * g[..., None], None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, start: int, vocab: int,
                                 group: Group) -> torch.Tensor:
    """Per-token losses (fp32) for logits (..., vocab_padded / tp) holding columns [start, start + local)."""
    return _VocabParallelCE.apply(logits, targets, start, vocab, group)
