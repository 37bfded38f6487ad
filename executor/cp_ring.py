"""Ring attention: causal attention over a sequence split across the ranks of a context-parallel group.

Forward (Liu et al. 2023, "Ring Attention with Blockwise Transformers", §3 / Alg. 1): each rank keeps its queries;
the K/V blocks travel around the ring (n-1 exchanges: send to rank+1, receive from rank-1). The exchange for step
s+1 is issued before step s's block is computed, so communication overlaps compute. Each block gives a partial
(out, lse) over a disjoint key set; partials are merged by log-sum-exp (`loom.kernels.merge_attention_partials`).
K and V travel as one (2, batch, kv_heads, seq_local, head_dim) buffer: with GQA only kv_heads heads are sent.

Backward (same paper, and TransformerEngine's `AttnFuncWithCPAndKVP2P.backward` for the structure): K/V travel the
ring again (n-1 exchanges), and with them an fp32 dK/dV accumulator: at step s >= 1 rank r holds block (r-s) mod n
and that block's travelling accumulator, adds its contribution and passes it on. The owner keeps its own (step 0)
contribution locally, so the accumulator of block j starts at rank j+1 and reaches j after n-1 hops: n-1 dK/dV
messages, like the K/V ones. dQ stays local. The accumulator travels in fp32 (twice the bytes of bf16 K/V) so the
n-1 partial sums do not round to bf16 on the way.

Block gradients use the merged (out, lse) of the whole row: FlashAttention-2's backward (Dao 2023, Alg. 2) with
P = exp(S - lse) and delta = rowsum(dO·out) taken from the merged row is exactly the block's share of the full
gradient (P is the block's slice of the full softmax), so no per-block outputs are kept
(`loom.kernels.flash_attention_backward`, Triton on GPU, torch twin on CPU).

`simulated_ring_attention` runs the same per-rank block arithmetic for n virtual ranks inside one process (no
communication): it checks the block logic on one device and is the GPU check's subject.
"""
from __future__ import annotations

import math

import torch

from loom.kernels import (flash_attention_backward, flash_attention_forward, flash_attention_with_lse,
                          merge_attention_partials)

from .comm import Group
from .cp_layout import Layout, shard, token_positions, visible_block
from .pp_p2p import DEFAULT_TIMEOUT_S, irecv, isend

_TAG_FWD_KV, _TAG_BWD_KV, _TAG_BWD_DKV = 1 << 20, 2 << 20, 3 << 20


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (the tests' exact reference)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows(t: torch.Tensor, s: slice) -> torch.Tensor:
    return t[:, :, s]


def _c(*ts: torch.Tensor) -> list[torch.Tensor]:
    # Row slices of (b, h, s, d) are strided views; the kernels index lse as dense (b, h, s): copy.
    return [t.contiguous() for t in ts]


def _block_forward(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return flash_attention_forward(*_c(q, k, v), causal, softmax_scale=scale)


def _block_grads(q, k, v, out, lse, dout, causal: bool, scale: float):
    """(dq, dk, dv): this block's share of the gradient of rows whose merged result is (out, lse)."""
    return flash_attention_backward(*_c(dout, q, k, v, out, lse), causal, softmax_scale=scale)


def _accumulate(out: torch.Tensor, lse: torch.Tensor, rows: slice, o_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    o, l = merge_attention_partials(_rows(out, rows), _rows(lse, rows), o_b, lse_b)
    out[:, :, rows], lse[:, :, rows] = o, l


class _Ring:
    """Send to the next rank of the group, receive from the previous one."""

    def __init__(self, group: Group, timeout_s: float):
        self.g, self.timeout_s = group, timeout_s
        self.next, self.prev = (group.rank + 1) % group.size, (group.rank - 1) % group.size

    def shift(self, t: torch.Tensor, tag: int, what: str):
        recv = irecv(tuple(t.shape), t.dtype, t.device, self.g, self.prev, tag,
                     f"cp rank {self.g.rank}: recv {what} from cp rank {self.prev}", self.timeout_s)
        send = isend(t, self.g, self.next, tag, f"cp rank {self.g.rank}: send {what} to cp rank {self.next}",
                     self.timeout_s)
        return recv, send


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group: Group, layout: Layout, causal: bool, scale: float, timeout_s: float):
        n, r, L = group.size, group.rank, q.shape[2]
        ring = _Ring(group, timeout_s)
        # q's memory layout (sequence-first in the model): out then reshapes into the output projection's input
        # as a view, so the two save one storage, as loom.kernels' attention does (kernels/twins.py)
        out = torch.zeros_like(q, dtype=_acc(q))
        lse = torch.full(q.shape[:3], float("-inf"), dtype=_acc(q), device=q.device)
        kv = torch.stack((k, v))
        for step in range(n):
            pending = ring.shift(kv, _TAG_FWD_KV + step, f"K/V step {step}") if step < n - 1 else None
            blk = visible_block(r, (r - step) % n, L, layout, causal)
            if blk is not None:
                o_b, lse_b = _block_forward(_rows(q, blk.q), _rows(kv[0], blk.k), _rows(kv[1], blk.k), blk.causal,
                                            scale)
                _accumulate(out, lse, blk.q, o_b, lse_b)
            if pending is not None:
                kv = pending[0].wait()
                pending[1].wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = (group, layout, causal, scale, timeout_s)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, layout, causal, scale, timeout_s = ctx.cfg
        n, r, L = group.size, group.rank, q.shape[2]
        ring = _Ring(group, timeout_s)
        dq = torch.zeros(q.shape, dtype=_acc(q), device=q.device)
        kv = torch.stack((k, v))
        own = torch.zeros(kv.shape, dtype=_acc(q), device=q.device)    # step 0: this rank's own block
        travel, pend_d = None, None
        for step in range(n):
            pend_kv = ring.shift(kv, _TAG_BWD_KV + step, f"K/V (backward) step {step}") if step < n - 1 else None
            if step == 1:
                travel = torch.zeros_like(own)              # the accumulator of block r-1 starts here
            elif step >= 2:                                 # the accumulator of the block we now hold
                travel = pend_d[0].wait()
                pend_d[1].wait()
            acc = own if step == 0 else travel
            blk = visible_block(r, (r - step) % n, L, layout, causal)
            if blk is not None:
                gq, gk, gv = _block_grads(_rows(q, blk.q), _rows(kv[0], blk.k), _rows(kv[1], blk.k),
                                          _rows(out, blk.q), _rows(lse, blk.q), _rows(dout, blk.q), blk.causal, scale)
                dq[:, :, blk.q] += gq.to(dq.dtype)
                acc[0][:, :, blk.k] += gk.to(dq.dtype)
                acc[1][:, :, blk.k] += gv.to(dq.dtype)
            if step >= 1:                                   # after step n-1 it goes home: r+1 owns block r-(n-1)
                pend_d = ring.shift(travel, _TAG_BWD_DKV + step, f"dK/dV step {step}")
            if pend_kv is not None:
                kv = pend_kv[0].wait()
                pend_kv[1].wait()
        if pend_d is not None:
            own += pend_d[0].wait()
            pend_d[1].wait()
        return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype), None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Group, layout: Layout = "zigzag",
                   causal: bool = True, softmax_scale: float | None = None,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.Tensor:
    """Attention of this rank's queries over the whole sequence; q (b, h, s_local, d), k/v (b, kv_h, s_local, d),
    all in `layout` order. Differentiable; communicates over `group` (the cp group)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not group.active:
        return flash_attention_with_lse(q, k, v, causal, softmax_scale=scale)[0]
    return RingAttention.apply(q, k, v, group, layout, causal, scale, timeout_s)


class SimulatedRingAttention(torch.autograd.Function):
    """n virtual cp ranks in one process: full-sequence q, k, v in, full-sequence out (natural order)."""

    @staticmethod
    def forward(ctx, q, k, v, n: int, layout: Layout, causal: bool, scale: float):
        S = q.shape[2]
        qs, ks, vs = ([shard(t, 2, n, r, layout) for r in range(n)] for t in (q, k, v))
        outs, lses = [], []
        for r in range(n):
            L = qs[r].shape[2]
            out = torch.zeros(qs[r].shape, dtype=_acc(q), device=q.device)
            lse = torch.full(qs[r].shape[:3], float("-inf"), dtype=_acc(q), device=q.device)
            for step in range(n):
                src = (r - step) % n
                blk = visible_block(r, src, L, layout, causal)
                if blk is not None:
                    o_b, lse_b = _block_forward(_rows(qs[r], blk.q), _rows(ks[src], blk.k), _rows(vs[src], blk.k),
                                                blk.causal, scale)
                    _accumulate(out, lse, blk.q, o_b, lse_b)
            outs.append(out.to(q.dtype))
            lses.append(lse)
        ctx.save_for_backward(q, k, v)
        ctx.parts = (qs, ks, vs, outs, lses)
        ctx.cfg = (n, layout, causal, scale, S)
        full = torch.empty_like(q)
        for r in range(n):
            full[:, :, token_positions(S, n, r, layout).to(q.device)] = outs[r]
        return full

    @staticmethod
    def backward(ctx, dout):
        qs, ks, vs, outs, lses = ctx.parts
        n, layout, causal, scale, S = ctx.cfg
        q, k, v = ctx.saved_tensors
        dq = torch.zeros(q.shape, dtype=_acc(q), device=q.device)
        dk = torch.zeros(k.shape, dtype=_acc(q), device=q.device)
        dv = torch.zeros(v.shape, dtype=_acc(q), device=q.device)
        pos = [token_positions(S, n, r, layout).to(q.device) for r in range(n)]
        for r in range(n):
            L = qs[r].shape[2]
            do_r = dout[:, :, pos[r]]
            for step in range(n):
                src = (r - step) % n
                blk = visible_block(r, src, L, layout, causal)
                if blk is None:
                    continue
                gq, gk, gv = _block_grads(_rows(qs[r], blk.q), _rows(ks[src], blk.k), _rows(vs[src], blk.k),
                                          _rows(outs[r], blk.q), _rows(lses[r], blk.q), _rows(do_r, blk.q),
                                          blk.causal, scale)
                dq[:, :, pos[r][blk.q]] += gq.to(dq.dtype)
                dk[:, :, pos[src][blk.k]] += gk.to(dq.dtype)
                dv[:, :, pos[src][blk.k]] += gv.to(dq.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def simulated_ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, layout: Layout = "zigzag",
                             causal: bool = True, softmax_scale: float | None = None) -> torch.Tensor:
    """Ring attention's arithmetic for n virtual ranks on one device (full sequences in natural order)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return SimulatedRingAttention.apply(q, k, v, n, layout, causal, scale)
