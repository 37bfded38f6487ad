"""Cost of one op in seconds: compute by FLOPs and efficiency, memory-bound work by bytes, collectives by α-β.

Compute op: t = (flops - attn_flops) / (peak · e_gemm) + attn_flops / (peak_attn · e_attn) + mem_bytes / (HBM ·
hbm_efficiency) · elementwise_traffic (1 for the optimizer) + layers · compute_overhead_s. e_gemm is the FLOP-weighted harmonic mean of the efficiencies of
one layer's GEMMs at their per-rank shapes (M = b·s/cp tokens; N, K = hidden and the TP-sharded projection
widths), so the time is Σ flops_i / (peak · e_i). With fp8 the GEMMs run at the fp8 peak, attention at bf16.

Collective (α-β model, Hockney 1994; ring volumes in the op's wire_bytes, see loom.spec.compile):
  t = count · α · steps + wire_bytes / B_eff.
- Inside one node: B_eff = intra_node_GBps · comm_efficiency, α = intra-node latency.
- A group spanning nodes with r members per node: a ring through all members crosses each node boundary once per
  channel; NCCL runs one channel per NIC, so the r members' NICs carry the inter-node part in parallel and the
  bottleneck link is B_eff = min(intra, r · inter) · comm_efficiency (equivalently the 2-level hierarchical
  all-reduce: reduce-scatter in node, all-reduce of B/r across nodes on each NIC, all-gather in node; Jia et al.
  2018 §4.3 "hierarchical all-reduce"). α = inter-node latency.
- Point-to-point (PP, CP ring) across nodes uses one NIC: B_eff = inter · comm_efficiency.
- steps (latency terms per call): all-reduce 2·⌈log2 n⌉, all-gather/reduce-scatter ⌈log2 n⌉ (NCCL picks
  tree/LL protocols for latency-bound sizes: latency grows with log n, not n), p2p 1.

A TP collective the plan overlaps with a GEMM (op.overlap, parallel.tp_comm_overlap) costs only what stays exposed
(`exposed_overlap`); the GEMM itself is in its compute op. With C the collective's time and G the GEMM's
(op.overlap_flops at the GEMM peak and efficiency), TransformerEngine's schedules (comm_gemm_overlap.cpp,
CommOverlapP2P / CommOverlap) give, per call and so for all `count` identical calls:
- "ring" (ring exchange, k = tp GEMM steps, k − 1 transfers of one chunk each): step i+1's chunk arrives while
  step i computes on the chunk it holds, the first on the local one: time (k−1)·max(G/k, C/(k−1)) + G/k,
  exposed (k−1)·max(0, C/(k−1) − G/k): nothing while a transfer is shorter than a GEMM chunk.
- "pipeline" (k = 4 GEMM chunks, each reduce-scattered beside the next): the last chunk's collective is
  exposed: time max(G + C/k, G/k + C), exposed max(C/k, C − G·(k−1)/k).
- "bulk" (beside an independent GEMM): exposed max(0, C − G).
Each chunk is charged C/k (userbuffers split one collective; the per-chunk latency is left out). Not modelled:
the 16 SMs TE's pipeline and bulk kernels take from the GEMM (num_sm = 16 of an H100's 132, set_sm_margin).
"""
from __future__ import annotations

import math

from loom.spec.mesh import Mesh
from loom.spec.plan import Op, OpKind

from .hardware import HardwareProfile

_P2P = frozenset({OpKind.PP_SEND_ACT, OpKind.PP_SEND_GRAD, OpKind.CP_KV_EXCHANGE})
_RECV = frozenset({OpKind.PP_RECV_ACT, OpKind.PP_RECV_GRAD})


class CostModel:
    def __init__(self, spec, hw: HardwareProfile, mesh: Mesh) -> None:
        m, p, t = spec.model, spec.plan, spec.training
        self.hw, self.mesh = hw, mesh
        prec = t.precision
        self.peak_gemm = hw.peak(prec)
        self.peak_attn = hw.peak("bf16") if prec == "fp8" and "bf16" in hw.peak_flops else hw.peak(prec)
        self.hbm = hw.hbm_GBps * 1e9 * hw.hbm_efficiency
        tokens = t.micro_batch * m.seq_len / p.cp
        h, f, tp = m.hidden, m.ffn_hidden, p.tp
        # (flops weight, M, N, K) of one layer's GEMMs per token: QKV, output projection, MLP in, MLP out.
        gemms = [((m.q_dim + 2 * m.kv_dim) * h, tokens, h, (m.q_dim + 2 * m.kv_dim) / tp),
                 (m.q_dim * h, tokens, m.q_dim / tp, h),
                 ((2 if m.gated else 1) * h * f, tokens, h, (2 if m.gated else 1) * f / tp),
                 (f * h, tokens, f / tp, h)]
        total = sum(g[0] for g in gemms)
        self.e_gemm = total / sum(w / hw.gemm_efficiency(a, b, c) for w, a, b, c in gemms)
        self.e_attn = hw.attention_efficiency(m.seq_len / p.cp, m.d_head)
        self._links = {d: self._link(d) for d in ("tp", "cp", "pp", "dp")}

    def _link(self, dim: str) -> tuple[float, float, float]:
        """(collective bandwidth, p2p bandwidth, latency) in bytes/s and s for groups along `dim`."""
        hw, eff = self.hw, self.hw.comm_efficiency
        intra, inter = hw.intra_node_GBps * 1e9, hw.inter_node_GBps * 1e9
        if not self.mesh.spans_nodes(dim):
            return intra * eff, intra * eff, hw.intra_node_latency_s
        r = self.mesh.ranks_per_node(dim)
        return min(intra, r * inter) * eff, inter * eff, hw.inter_node_latency_s

    def compute_time(self, op: Op) -> float:
        gemm = op.flops - op.attn_flops
        t = gemm / (self.peak_gemm * self.e_gemm) if gemm > 0 else 0.0
        if op.attn_flops > 0:
            t += op.attn_flops / (self.peak_attn * self.e_attn)
        traffic = 1.0 if op.kind == OpKind.OPTIMIZER else self.hw.elementwise_traffic
        t += op.mem_bytes * traffic / self.hbm
        return t + len(op.layers) * self.hw.compute_overhead_s

    def comm_time(self, op: Op) -> float:
        if op.kind in _RECV or op.group_size <= 1 and op.kind not in _P2P:
            return 0.0
        coll_bw, p2p_bw, alpha = self._links[op.group]
        if op.kind in _P2P:
            return op.count * alpha + op.wire_bytes / p2p_bw
        log_n = max(1, math.ceil(math.log2(op.group_size)))
        steps = 2 * log_n if op.kind in (OpKind.TP_ALLREDUCE, OpKind.DP_ALLREDUCE) else log_n
        return op.count * alpha * steps + op.wire_bytes / coll_bw

    def gemm_time(self, flops: float) -> float:
        return flops / (self.peak_gemm * self.e_gemm) if flops > 0 else 0.0

    def duration(self, op: Op) -> float:
        if op.kind.is_compute:
            return self.compute_time(op)
        if op.overlap:
            return exposed_overlap(op.overlap, self.comm_time(op), self.gemm_time(op.overlap_flops),
                                   op.overlap_splits)
        return self.comm_time(op)


def exposed_overlap(method: str, comm_s: float, gemm_s: float, splits: int) -> float:
    """Seconds a collective of comm_s adds to the GEMM of gemm_s it is overlapped with (module docstring)."""
    k = max(1, splits)
    if method == "ring":
        if k == 1:
            return comm_s
        return (k - 1) * max(0.0, comm_s / (k - 1) - gemm_s / k)
    if method == "pipeline":
        return max(comm_s / k, comm_s - gemm_s * (k - 1) / k)
    if method == "bulk":
        return max(0.0, comm_s - gemm_s)
    raise ValueError(f"unknown overlap method {method!r}")
