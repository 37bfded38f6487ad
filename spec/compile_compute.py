"""One compute action of a stage's schedule (F or B of a chunk and micro-batch) as ops: the FORWARD, RECOMPUTE and
BACKWARD ops with their FLOPs and HBM bytes, the CP K/V exchanges that feed them, the TP/SP collectives they issue
(compile_tp.py) and the edges into them (receive, own forward, ZeRO gathers). `ChunkStep` carries the action.

Per rank and per micro-batch of b·s tokens (b micro-batch, s seq_len, t = tp, c = cp, h hidden, ab activation bytes):
- FORWARD of a chunk of n layers: n·(2·P_layer_matmul + attention core) FLOPs per token (ModelSpec, Narayanan et al.
  2021 §5.1), plus the LM head 2·V·h on the last virtual stage; divided by t·c (TP shards every matmul, CP the
  tokens; zigzag CP balances causal attention). BACKWARD = 2 × FORWARD. RECOMPUTE: full reruns the layers' forward,
  selective the attention core (Korthikanti et al. 2022 §4.2), op (torchtitan's per-op selective AC) the unsaved
  matmuls (every second one) and all memory-bound work - the same accounting as train_flops_per_token.
- CP ring attention (Liu et al. 2023, Ring Attention; Megatron-LM/TransformerEngine p2p CP): c-1 steps per layer,
  each sending this rank's K and V block, b·(s/c)·2·kv_dim/t elements; the backward sends the K/V blocks again
  and c-1 dK/dV blocks, in fp32 (the accumulator's precision). Any recompute reruns attention, hence its exchange.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .compile_builder import _Builder
from .compile_tp import tp_ops
from .plan import OpKind


@dataclass
class ChunkStep:
    """One F or B action of a stage's schedule: where it runs, what its ops wait for, and the ops emitted so far."""
    stage: int
    chunk: int
    microbatch: int
    layers: range
    first: bool                      # the chunk is the first virtual stage (embedding)
    last: bool                       # the chunk is the last virtual stage (final norm, LM head)
    forward: bool                    # F (else B)
    first_forward: bool              # the chunk's first forward of the step
    before: list[int]                # ops the action waits for: its receive and, for B, its forward's output
    root: int | None = None          # ZeRO-3 root-unit gather (compile_dp.py)
    zero3: int | None = None         # ZeRO-3 layer gather
    pgather: int | None = None       # overlap_param_gather's gather
    chain: list[int] = field(default_factory=list)   # compute ops and their TP collectives, in order

    @property
    def n(self) -> int:
        return len(self.layers)

    @property
    def common(self) -> dict:
        return dict(chunk=self.chunk, microbatch=self.microbatch, layers=self.layers)


def _compute(b: _Builder, st: ChunkStep, kind: OpKind, flops: float, attn: float, mem: float,
             cp_msgs: list[tuple[int, float]]) -> int:
    """A compute op, the CP exchanges before it (pipelined into it) and the TP/SP collectives after it."""
    s, n, common, before, group_ops = st.stage, st.n, st.common, st.before, st.chain
    cp_ops = [c for c in (b.collective(s, OpKind.CP_KV_EXCHANGE, k, msg, **common) for k, msg in cp_msgs)
              if c is not None]
    op = b.add(s, kind, "compute", flops=flops, attn_flops=attn, mem_bytes=mem, **common)
    for u in before + ([group_ops[-1]] if group_ops else []):
        b.edge(u, op)
    for cp_op, (k, _) in zip(cp_ops, cp_msgs):
        for u in before:
            b.edge(u, cp_op)
        b.edge(cp_op, op, frac=1.0 / k, tail=1.0 / k)   # KV blocks overlap attention
    if st.root is not None and not group_ops:
        b.edge(st.root, op)
    if st.zero3 is not None and not group_ops:
        b.edge(st.zero3, op, frac=1.0 / n, tail=1.0 / n)  # layer-by-layer prefetch
    if st.pgather is not None and not group_ops:
        k = b.ops[st.pgather].count
        b.edge(st.pgather, op, *((1.0 / k, 1.0 / k) if b.v == 1 else (1.0, 0.0)))  # bucket by bucket
    group_ops.append(op)
    for k, count, msg, *ov in tp_ops(b.sh, kind, n, st.first, st.last):
        extra = dict(overlap=ov[0], overlap_flops=ov[1] * count, overlap_splits=ov[2]) \
            if ov and ov[0] else {}
        t = b.collective(s, k, count, msg, **extra, **common)
        if t is not None:
            b.edge(group_ops[-1], t)
            group_ops.append(t)
    return op


def compute_action(b: _Builder, st: ChunkStep) -> int:
    """Emit the action's ops: FORWARD, or [RECOMPUTE →] BACKWARD, each with its CP and TP/SP collectives. Returns
    the FORWARD/BACKWARD op; `st.chain[-1]` is the op whose end makes the action's output ready."""
    sh, par, recompute = b.sh, b.spec.plan, b.spec.training.recompute
    n, last = st.n, st.last
    toks = sh.tokens / sh.shard
    f_flops = toks * (n * (sh.layer_f + sh.attn_f) + (sh.head_f if last else 0.0))
    f_attn = toks * n * sh.attn_f
    f_mem = sh.tokens / sh.cp * (n * sh.layer_mem + (sh.head_mem if last else 0.0))
    cp_steps = n * (par.cp - 1)
    # Ring attention (executor/cp_ring.py): per layer cp-1 K/V blocks in the forward (and any recompute,
    # which reruns attention); the backward sends the K/V blocks again and cp-1 dK/dV accumulators (fp32).
    kv = [(cp_steps, sh.kv_msg)]
    if st.forward:
        return _compute(b, st, OpKind.FORWARD, f_flops, f_attn, f_mem, kv)
    if recompute != "none" and n > 0:
        if recompute == "full":
            r = (toks * n * (sh.layer_f + sh.attn_f), f_attn, sh.tokens / sh.cp * n * sh.layer_mem)
        elif recompute == "op":                # unsaved matmuls + all memory-bound work
            r = (toks * n * sh.op_f, 0.0, sh.tokens / sh.cp * n * sh.layer_mem)
        else:
            r = (toks * n * sh.attn_f, f_attn, 0.0)
        _compute(b, st, OpKind.RECOMPUTE, *r, kv)
    return _compute(b, st, OpKind.BACKWARD, 2 * f_flops, 2 * f_attn, 2 * f_mem, kv + [(cp_steps, sh.dkv_msg)])
