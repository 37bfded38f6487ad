"""Per-rank sizes the plan compiler derives once from a spec: byte widths of activations, parameters, gradients
and optimizer traffic, and `_Shapes` (one micro-batch's tokens, FLOPs per token of a layer / the LM head / the
GEMMs, HBM bytes of the memory-bound work, message sizes of TP/SP, CP and PP, a chunk's parameters and DP units).
simulator/fast_cost.py prices from the same `_Shapes`, so the fast path and the plan agree by construction.
"""
from __future__ import annotations

from .units import chunk_tensors, chunk_units

ACT_BYTES = {"bf16": 2, "fp16": 2, "fp8": 2, "fp32": 4}      # fp8 runs matmuls in fp8, keeps activations bf16
PARAM_BYTES = ACT_BYTES
GRAD_BYTES = {"fp32": 4, "bf16": 2}
# HBM traffic of one optimizer step per parameter (fused kernels; apex/torch fused AdamW): read grad, read+write
# fp32 master weight (8), read+write m and v (16), write the low-precision copy (2): 26 + grad bytes. Momentum SGD
# (torch.optim.SGD's momentum_buffer, the executor's "sgd"): master 8 + momentum read+write 8 + copy 2 = 18.
OPT_STATE_BYTES = {"adamw": 26, "adam": 26, "sgd": 18}
FP32_BYTES = 4


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
