"""A Llama- or GPT-2-style decoder built per rank: this rank's TP shards of a range of layers (a pipeline stage),
the embedding if the stage is first, the final norm and LM head if it is last.

Weights are initialised by a counter-based generator (init_rng.py): element i of parameter `name` is a pure function
of (seed, name, i), so each rank computes only the elements of its own TP shard (rows of a column-parallel weight,
columns of a row-parallel one, its rows of the padded vocabulary table, whose padding rows are zeros) and every
layout (dp, tp, sp, pp, cp, zero) still starts from exactly the single-process model: the premise of the parity
tests. No full-size tensor of a sharded parameter exists on any rank; a tied head on another stage than the
embedding computes its rows of the same table ("embed") again. Shards are built on the host and moved to the
device; with `BuildCtx.params_on_host` (ZeRO-3) the parameters are meta tensors carrying their initialiser and
DataParallel computes only this rank's DP shard of each unit (executor/dp.py), on the host, and sends it.
Init: normal(0, 0.02), with the residual output projections scaled by 1/sqrt(2·layers) (GPT-2, Radford et al. 2019
§2.3); norms one, biases zero, learned positions normal(0, 0.01).

Context parallel (part 2) replaces `Attention.core` (q, k, v -> out, on the local sequence chunk); pipeline
parallel builds `Decoder(first=..., last=..., layers=range(...))` per stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from loom.spec import ModelSpec
from loom.spec.units import padded_vocab

from . import ops, sac
from .init_rng import Init, normal_block
from .comm import SINGLE, Group
from .tp import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, column_parallel_linear, enter_tp,
                 leave_tp, mark, param, vocab_parallel_cross_entropy)


@dataclass
class BuildCtx:
    """What a rank needs to build its part of the model."""
    model: ModelSpec
    tp: Group = SINGLE
    sp: bool = False
    recompute: str = "none"
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Build the parameters as meta tensors (shape only, no storage) carrying their initialiser (init_rng.Init as
    # `loom_init`): DataParallel computes each unit's values itself (executor/dp_unit.py build_unit), so under
    # ZeRO-3 a rank computes and holds only its DP shard of the unit, never its whole TP shard, on the host or
    # the device.
    # Meta rather than storage-less host tensors: reading one by mistake raises an error (a CPU tensor whose
    # storage was resized to 0 crashes the process), and DataParallel swaps each for its view of the unit's buffer
    # in place (torch.utils.swap_tensors: the same Parameter object, so modules and tied references still hold it).
    # Off: Decoder computes its TP shards and moves them to the device.
    params_on_host: bool = False
    def _span(self, n: int) -> tuple[int, int]:
        """This TP rank's range of n split into tp parts (torch.chunk's: ceil(n / tp) each, the last may be short)."""
        per = -(-n // self.tp.size)
        lo = min(n, self.tp.rank * per)
        return lo, min(n, lo + per)

    def shard(self, name: str, shape: tuple[int, int], std: float, dim: int | None, pad_rows: int = 0
              ) -> torch.Tensor:
        """This rank's TP shard of parameter `name` (full shape `shape`, normal(0, std)) on the host: split along
        `dim` (0: rows, as column-parallel weights and the vocabulary table; 1: columns, as row-parallel weights;
        None: replicated, the whole tensor), after appending `pad_rows` zero rows (TP vocabulary padding). Only the
        shard's own elements are computed (init_rng.py), the same values the full tensor holds there."""
        span = self._span(shape[0] + pad_rows if dim == 0 else shape[1]) if dim is not None else None
        if self.params_on_host:
            rows = span if dim == 0 else (0, shape[0])
            local = (rows[1] - rows[0], *((span[1] - span[0],) if dim == 1 else shape[1:]))
            return self._deferred(Init(local, seed=self.seed, name=name, full=tuple(shape), std=std, rows=rows,
                                       cols=span if dim == 1 else None))
        return normal_block(self.seed, name, shape, std, rows=span if dim == 0 else None,
                            cols=span if dim == 1 else None, pad_rows=pad_rows)

    def zeros(self, n: int, split: bool) -> torch.Tensor:
        """A zero bias of full length n: this rank's part if `split` (column-parallel), else all of it."""
        lo, hi = self._span(n) if split else (0, n)
        return self._deferred(Init((hi - lo,), const=0.0)) if self.params_on_host else torch.zeros(hi - lo)

    def ones(self, n: int) -> torch.Tensor:
        """A replicated tensor of n ones (a norm's weight)."""
        return self._deferred(Init((n,), const=1.0)) if self.params_on_host else torch.ones(n)

    @staticmethod
    def _deferred(init: Init) -> torch.Tensor:
        """A meta tensor of the local shape carrying its initialiser (tp.param carries it onto the Parameter)."""
        t = torch.empty(init.shape, device="meta")
        t.loom_init = init
        return t


def amp_cast(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype when autocast is on (else unchanged): what enters or leaves a TP region travels in
    the training precision, as Megatron-LM's bf16 activations do, so the TP/SP collectives (and their gradients'
    in the backward) move the plan's bytes (spec/compile.py: ab per element). The linears the input feeds would
    cast it anyway, so their forward is unchanged."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return x.to(torch.get_autocast_dtype(dev))
    return x


class Norm(nn.Module):
    def __init__(self, ctx: BuildCtx):
        super().__init__()
        m = ctx.model
        self.eps, self.kind = m.norm_eps, m.norm
        sp = ctx.sp and ctx.tp.active
        self.weight = mark(param(ctx.ones(m.hidden)), tp_split=False, sp_grad=sp, decay=False)
        self.bias = mark(param(ctx.zeros(m.hidden, False)), tp_split=False, sp_grad=sp,
                         decay=False) if m.norm == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class Attention(nn.Module):
    def __init__(self, ctx: BuildCtx, prefix: str):
        super().__init__()
        m, tp = ctx.model, ctx.tp
        std, out_std = 0.02, 0.02 / math.sqrt(2 * m.layers)
        b = (lambda d, split: ctx.zeros(d, split)) if m.bias else (lambda d, split: None)
        col = lambda n, d: ColumnParallelLinear(ctx.shard(prefix + n, (d, m.hidden), std, 0), b(d, True), tp)
        self.q, self.k, self.v = col("q", m.q_dim), col("k", m.kv_dim), col("v", m.kv_dim)
        self.o = RowParallelLinear(ctx.shard(prefix + "o", (m.hidden, m.q_dim), out_std, 1), b(m.hidden, False), tp,
                                   ctx.sp)
        self.heads, self.kv_heads, self.d = m.heads // tp.size, m.n_kv_heads // tp.size, m.d_head
        self.rope = m.position == "rope"
        self.selective = ctx.recompute == "selective"
        # per-op recompute saves attention's (out, lse): it needs attention as one op (executor/sac.py)
        self.core: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = \
            sac.attention_out if ctx.recompute == "op" else ops.attention

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        s, b, _ = x.shape                                   # x: full sequence, this rank's heads follow
        q = self.q(x).view(s, b, self.heads, self.d).permute(1, 2, 0, 3)
        k = self.k(x).view(s, b, self.kv_heads, self.d).permute(1, 2, 0, 3)
        v = self.v(x).view(s, b, self.kv_heads, self.d).permute(1, 2, 0, 3)
        if self.rope:
            q, k = ops.apply_rope(q, k, *rope)
        if self.selective:                                  # Korthikanti et al. 2022 §4.3: keep only q, k, v
            out = checkpoint(self.core, q, k, v, use_reentrant=False)
        else:
            out = self.core(q, k, v)
        return self.o(out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.d))


class MLP(nn.Module):
    def __init__(self, ctx: BuildCtx, prefix: str):
        super().__init__()
        m, tp = ctx.model, ctx.tp
        std, out_std = 0.02, 0.02 / math.sqrt(2 * m.layers)
        b = (lambda d, split: ctx.zeros(d, split)) if m.bias else (lambda d, split: None)
        self.gated = m.gated
        col = lambda n: ColumnParallelLinear(ctx.shard(prefix + n, (m.ffn_hidden, m.hidden), std, 0),
                                             b(m.ffn_hidden, True), tp)
        self.up = col("up")
        if self.gated:
            self.gate = col("gate")
        self.down = RowParallelLinear(ctx.shard(prefix + "down", (m.hidden, m.ffn_hidden), out_std, 1),
                                      b(m.hidden, False), tp, ctx.sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ops.swiglu(self.gate(x), self.up(x)) if self.gated else ops.gelu(self.up(x))
        return self.down(h)


class Block(nn.Module):
    """Pre-norm transformer layer. With TP: one enter/leave pair around attention and one around the MLP, i.e.
    one all-reduce per sub-block forward and one backward (Shoeybi et al. 2019 §3)."""

    def __init__(self, ctx: BuildCtx, index: int):
        super().__init__()
        p = f"layers.{index}."
        self.index = index
        self.norm1, self.attn = Norm(ctx), Attention(ctx, p + "attn.")
        self.norm2, self.mlp = Norm(ctx), MLP(ctx, p + "mlp.")
        self.tp, self.sp = ctx.tp, ctx.sp and ctx.tp.active

    def _sub(self, x: torch.Tensor, norm: Norm, f: Callable, bias: torch.Tensor | None, *args) -> torch.Tensor:
        y = leave_tp(f(enter_tp(amp_cast(norm(x)), self.tp, self.sp), *args), self.tp, self.sp)
        return x + (y if bias is None else y + bias)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        x = self._sub(x, self.norm1, self.attn, self.attn.o.bias, rope)
        return self._sub(x, self.norm2, self.mlp, self.mlp.down.bias)


class Decoder(nn.Module):
    """This rank's part of the model. forward(ids) returns hidden states (seq_local, batch, hidden); `loss`
    applies the final norm, the vocab-parallel head and cross-entropy."""

    def __init__(self, ctx: BuildCtx, layers: range | None = None, first: bool = True, last: bool = True):
        super().__init__()
        m, tp = ctx.model, ctx.tp
        self.spec, self.tp, self.sp = m, tp, ctx.sp and tp.active
        self.first, self.last = first, last
        self.recompute = ctx.recompute
        self.fused_ce: bool | None = None        # None: the fused kernel loss on CUDA without TP (tests force it)
        self.vocab_padded = padded_vocab(m.vocab, tp.size)
        # Global positions of this rank's local tokens (1-D int64), None = 0..s-1. Context parallelism sets it
        # (its tokens are a zigzag selection of the sequence): learned position embeddings read these rows.
        self.position_ids: torch.Tensor | None = None
        layers = range(m.layers) if layers is None else layers
        pad = self.vocab_padded - m.vocab
        if first:
            self.embed = VocabParallelEmbedding(ctx.shard("embed", (m.vocab, m.hidden), 0.02, 0, pad), tp)
            if m.position == "learned":
                self.pos = mark(param(ctx.shard("pos", (m.seq_len, m.hidden), 0.01, None)), tp_split=False,
                                sp_grad=self.sp)
        self.layers = nn.ModuleList(Block(ctx, i) for i in layers)
        if last:
            self.norm = Norm(ctx)
            if m.tied_embeddings and first:
                self.head_weight = self.embed.weight
            else:
                # tied, on another stage than the embedding: this rank's rows of the same table, computed again
                w = ctx.shard("embed" if m.tied_embeddings else "head", (m.vocab, m.hidden), 0.02, 0, pad)
                self.head_weight = mark(param(w), tp_split=tp.active)
        if m.position == "rope":
            cos, sin = ops.rope_tables(m.seq_len, m.d_head, m.rope_theta, ctx.device)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)
        self.loom_device = ctx.device  # where the parameters live in training (DataParallel places them there)
        if not ctx.params_on_host:
            self.to(ctx.device)        # the host-built shards (Module.to keeps the Parameter objects and marks)

    def rope(self):
        return (self.cos, self.sin) if self.spec.position == "rope" else None

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (batch, seq) -> (seq_local, batch, hidden): summed over TP (g), or reduce-scattered with SP (f')."""
        # The residual stream is in the training precision from here on (Megatron-LM's, without
        # --fp32-residual-connection): its saved norm inputs and pipeline messages are 2 bytes under bf16.
        x = amp_cast(self.embed(ids.t()))
        if self.tp.active:
            x = leave_tp(x.contiguous(), self.tp, self.sp)
        if self.spec.position == "learned":
            s = x.shape[0]                                   # local sequence (÷tp with SP)
            lo = self.tp.rank * s if self.sp else 0
            if self.position_ids is None:
                x = x + self.pos[lo:lo + s, None, :]
            else:                                            # SP shards the (CP-local) sequence after the lookup
                x = x + self.pos[self.position_ids[lo:lo + s], None, :]
        return x

    def run_layers(self, x: torch.Tensor) -> torch.Tensor:
        rope = self.rope()
        for layer in self.layers:
            if self.recompute == "full":                     # keep only the layer input (Chen et al. 2016)
                x = checkpoint(layer, x, rope, use_reentrant=False)
            elif self.recompute == "op":                     # torchtitan's per-op selective AC (sac.py)
                x = sac.run(layer, x, rope)
            else:
                x = layer(x, rope)
        return x

    def token_losses(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy (fp32), shape (seq, batch). The head is column-parallel over the vocabulary
        and the loss vocab-parallel: logits are never gathered."""
        h = enter_tp(amp_cast(self.norm(x)), self.tp, self.sp)
        logits = column_parallel_linear(h, self.head_weight)     # with SP it saves h's shard (tp.py)
        per = self.vocab_padded // self.tp.size
        return vocab_parallel_cross_entropy(logits, targets.t(), self.tp.rank * per, self.spec.vocab, self.tp)

    def loss_sum(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Σ token losses (fp32 scalar). One CUDA rank without TP uses loom.kernels' chunked fused linear
        cross-entropy (the logits are never materialised); otherwise the vocab-parallel loss above."""
        use = self.fused_ce if self.fused_ce is not None else x.is_cuda
        fused = ops.fused_linear_cross_entropy() if (use and not self.tp.active) else None
        if fused is None:
            return self.token_losses(x, targets).sum()
        h = self.norm(x)
        dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else h.dtype
        w = self.head_weight[: self.spec.vocab]
        return fused(h.to(dt), w.to(dt), targets.t().contiguous(), reduction="sum")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.run_layers(self.embed_tokens(ids))
