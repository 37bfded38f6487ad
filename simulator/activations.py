"""Activation memory: what one transformer layer saves for its backward pass, and how many micro-batches a
pipeline stage holds at once.

The per-layer count follows Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" §4.1 and Table 2, term by term, generalised to GQA (K and V are s·b·kv_dim, not s·b·h), SwiGLU MLPs and
FlashAttention. With their assumptions (MHA, GELU with ffn = 4h, dropout, no FlashAttention) the terms below add
up to exactly their 34·s·b·h + 5·a·s²·b bytes per layer, which a test checks.

Bytes per element: activations in the compute dtype (2 for bf16/fp16/fp8-with-bf16-storage, 4 for fp32), dropout
masks 1 byte, softmax statistics (FlashAttention's log-sum-exp) always fp32 (4). `tokens` below is the per-rank
token count of one micro-batch, s·b/cp: context parallelism shards the sequence, so every term divides by cp.

Parallel sharding (Korthikanti §4.2.2, §4.2.3): tensor parallelism shards what lives inside the attention heads
and the MLP intermediate (Q, K, V, scores, attention output, the ffn-wide tensors); the norm inputs, the inputs of
the first linear of each block and the dropout masks on the residual stream stay replicated, unless sequence
parallelism also shards them over tp, in which case everything divides by tp.
"""
from __future__ import annotations

from dataclasses import dataclass

from loom.spec.model import ModelSpec

MASK_BYTES = 1          # dropout masks (Korthikanti §4.1: "a mask of size sbh ... 1 byte per element")
FP32 = 4                # softmax statistics, fp32 logits
TOKEN_ID_BYTES = 8      # int64 token ids (Megatron's theoretical_memory_usage: "8 * seq_length * micro_batch")


@dataclass(frozen=True)
class ActivationAssumptions:
    """What the kernels of a run keep. Loom's default is a modern stack: FlashAttention (no s² tensor; only the
    log-sum-exp per row is saved), no dropout (Llama-style pretraining uses none), eager PyTorch SwiGLU (saves
    gate, up, silu(gate) and their product: four s·b·f tensors). `flash_attention=False, dropout=True` with a
    GELU model reproduces Korthikanti's Table 2 exactly.
    `norm_statistics`: also count the norms' fp32 per-row statistics, which Korthikanti's count leaves out (a few
    bytes per token): RMSNorm's rstd (loom.kernels' RMSNorm, kernels/rmsnorm.py; TransformerEngine's rsigma),
    LayerNorm's mean and rstd (F.layer_norm saves both); 4 bytes per statistic per token, two norms per layer.
    `loss`: the cross-entropy implementation, which sets what the last stage keeps and needs at the loss backward
    (simulator/memory.py `_logits_bytes`): "unfused" (eager aten cross-entropy on an fp32 copy of the logits, the
    default), "loss_parallel" (torch.distributed.tensor.parallel.loss_parallel, eager: torchtitan's loss under TP)
    or "compiled" (the same loss under torch.compile: torchtitan since bbb1b616, Apr 2025, with training.compile),
    or "fused_chunked" (a linear + cross-entropy kernel that computes the gradients in the forward, token chunk by
    token chunk, never holding the logits: Liger-Kernel's approach, loom.kernels' fused_linear_cross_entropy, which
    Loom's executor runs on one GPU without TP).
    `sp_gathered_head_input`: with sequence parallelism the LM head saves its all-gathered (full-sequence) input,
    as DTensor's ColwiseParallel(input_layouts=Shard(1)) does (torchtitan's "output" plan); Megatron-LM and Loom's
    executor (executor/tp.py column_parallel_linear) save the sequence shard and all-gather it again in the
    backward, which is the default."""
    flash_attention: bool = True
    dropout: bool = False
    swiglu_saved_tensors: int = 4
    norm_statistics: bool = False
    loss: str = "unfused"
    sp_gathered_head_input: bool = False

    def __post_init__(self) -> None:
        if self.loss not in LOSS_IMPLEMENTATIONS:
            raise ValueError(f"ActivationAssumptions.loss = {self.loss!r}: use one of {LOSS_IMPLEMENTATIONS}")


LOSS_IMPLEMENTATIONS = ("unfused", "loss_parallel", "compiled", "fused_chunked")
FUSED_CE_CHUNK_BYTES = 256 * 2**20      # kernels/fused_linear_ce.py _CHUNK_BYTES: one chunk's logits at most


def fused_ce_chunk_tokens(tokens: int, vocab: int, elt: int) -> int:
    """Tokens per chunk of loom.kernels' fused linear cross-entropy (kernels/fused_linear_ce.py
    default_chunk_size: logits of at most 256 MiB, a multiple of 64 tokens)."""
    c = max(64, FUSED_CE_CHUNK_BYTES // (vocab * elt) // 64 * 64)
    return max(1, min(c, tokens))


DEFAULT = ActivationAssumptions()


@dataclass(frozen=True)
class LayerActivations:
    """Bytes one layer saves for one micro-batch on one GPU, split by what tensor parallelism does to them."""
    replicated: float      # residual-stream tensors: divided by tp only under sequence parallelism
    sharded: float         # head-/ffn-wide tensors: always divided by tp
    attention_core: float  # what selective recompute drops (scores/softmax/dropout, or FlashAttention's LSE)

    def total(self, tp: int, sp: bool) -> float:
        return self.replicated / (tp if sp else 1) + (self.sharded + self.attention_core) / tp


def layer_terms(m: ModelSpec, tokens: float, act_bytes: int, a: ActivationAssumptions = DEFAULT,
                seq_for_scores: float | None = None) -> LayerActivations:
    """The saved tensors of one transformer layer, unsharded (tp = 1), for `tokens` = s·b/cp tokens.

    Attention block (Korthikanti §4.1, "Attention block"):
      norm-1 input                           2·sbh   replicated (they count both LayerNorm inputs as 4sbh)
      QKV projection input (norm-1 output)   2·sbh   replicated
      Q and K, kept for QKᵀ                  2·sb·q_dim + 2·sb·kv_dim   sharded (they: 4sbh)
      V, kept for the attention over values  2·sb·kv_dim                sharded (they: 2sbh)
      output projection input                2·sb·q_dim                 sharded (they: 2sbh); with
                                             FlashAttention this is also the O tensor its backward needs
      attention-output dropout mask          1·sbh   replicated (only with dropout)
      core without FlashAttention: softmax output 2·a·s²·b, its dropout mask a·s²·b and the dropout output
      2·a·s²·b (5as²b); without dropout only the softmax output (2as²b) is kept
      core with FlashAttention: the log-sum-exp, fp32, one per row and head: 4·a·sb
    MLP block (Korthikanti §4.1, "MLP"):
      norm-2 input                           2·sbh   replicated
      first linear input (norm-2 output)     2·sbh   replicated
      GELU: its input and its output (the second linear's input)    2·sbf + 2·sbf    sharded (they: 8sbh + 8sbh)
      SwiGLU: gate, up, silu(gate) and gate·up (the down projection's input): 4 × 2·sbf   sharded
      MLP dropout mask                       1·sbh   replicated (only with dropout)
    """
    h, f, q, kv, heads = m.hidden, m.ffn_hidden, m.q_dim, m.kv_dim, m.heads
    e = act_bytes
    drop = MASK_BYTES if a.dropout else 0
    stats = (1 if m.norm == "rmsnorm" else 2) if a.norm_statistics else 0
    replicated = tokens * (e * h          # norm-1 input
                           + e * h        # QKV input
                           + drop * h     # attention-output dropout mask
                           + e * h        # norm-2 input
                           + e * h        # MLP first-linear input
                           + drop * h     # MLP dropout mask
                           + 2 * stats * FP32)   # the two norms' per-row statistics (norm_statistics)
    ffn_tensors = a.swiglu_saved_tensors if m.gated else 2
    sharded = tokens * (e * (q + kv)      # Q, K
                        + e * kv          # V
                        + e * q           # output projection input (= attention output O)
                        + ffn_tensors * e * f)
    if a.flash_attention:
        core = tokens * FP32 * heads      # log-sum-exp per (token, head)
    else:
        # a·s²·b score elements per micro-batch: tokens·s (tokens = s·b/cp; each query scores the whole sequence)
        s = seq_for_scores if seq_for_scores is not None else m.seq_len
        scores = tokens * s * heads
        core = scores * (e + MASK_BYTES + e) if a.dropout else scores * e
    return LayerActivations(replicated, sharded, core)


def op_layer_bytes(m: ModelSpec, tokens: float, act_bytes: int, tp: int, sp: bool) -> float:
    """Bytes one layer keeps under per-op selective recompute ("op", torchtitan's
    `activation_checkpoint.selective_ac_option = "op"`), for `tokens` tokens of one micro-batch on one GPU.

    torchtitan/models/llama3/infra/parallelize.py (@42b0beb, June 2025; the same rule as
    torchtitan/parallelisms/parallelize_llama.py @d4c86e37, Jan 2025) checkpoints each transformer block with
    torch.utils.checkpoint's selective policy: the outputs of the ops in `_save_list` are MUST_SAVE, everything
    else PREFER_RECOMPUTE, except that only every second aten.mm is saved (a per-block counter; the 1st, 3rd,
    5th, ... mm are kept). What the block then holds from its forward until its backward:
      - its input, kept by the checkpoint for the recompute         act·T·h   (/tp under SP)
      - outputs of matmuls 1, 3, 5, 7 in forward order (ModelSpec.layer_matmuls): Q and V (column-parallel:
        act·T·q_dim/tp, act·T·kv_dim/tp), the MLP's first linear (gate for SwiGLU, up for GELU: act·T·f/tp)
        and, for SwiGLU, the down projection (row-parallel: its (T, h) partial sum before the TP reduction,
        act·T·h, not divided by tp)
      - the attention kernel's outputs (SDPA flash/efficient attention is in the save list): out act·T·q_dim/tp
        and the fp32 log-sum-exp 4·T·heads/tp
    Not counted: aten.max outputs (float8 amax scalars: a few bytes; abs, full-size, was in the list until
    torchtitan #820, Feb 2025, and Loom models float8 runs as bf16) and, with SP, the reduce_scatter outputs
    torchtitan also saves (act·T·h/tp per row-parallel linear): Loom's policy recomputes collectives (executor
    sac.py), and no torchtitan run it is checked against uses SP with this policy.
    Everything else (norms, RoPE, the activation function, K, the output projection, up) is rebuilt in the
    backward: see `op_recompute_bytes` for that transient."""
    e, h, T = act_bytes, m.hidden, tokens
    mms = m.layer_matmuls()
    # Row-parallel under TP: the output projection and the MLP's last linear; their output is the full (T, h)
    # partial sum before the TP reduction (or SP reduce-scatter). The others are column-parallel (width / tp).
    row_parallel = {3, len(mms) - 1}
    kept = e * T * h / (tp if sp else 1)                                   # the block's input
    for j, (_, out) in enumerate(mms):
        if j % 2 == 0:                                                     # the 1st, 3rd, 5th, 7th matmul
            kept += e * T * out / (1 if j in row_parallel else tp)
    kept += (e * T * m.q_dim + FP32 * T * m.heads) / tp                    # attention out and log-sum-exp
    return kept


def layer_bytes(m: ModelSpec, tokens: float, act_bytes: int, tp: int, sp: bool, recompute: str,
                a: ActivationAssumptions = DEFAULT) -> float:
    """Bytes one layer keeps between its forward and its backward, for one micro-batch, on one GPU.

    - "none": every saved tensor above.
    - "selective" (Korthikanti §4.2.1): the attention core is recomputed, so its term is dropped. Without
      FlashAttention that is the 5as²b term; with FlashAttention the backward already recomputes the scores
      from Q, K, V, O and the LSE, so selective recompute only drops the LSE (a few bytes per token).
    - "full" (Korthikanti §4.2, Table 2 last row): only the layer input, 2·sbh, divided by tp under sequence
      parallelism (Megatron keeps the SP-sharded input and all-gathers it again for the recompute).
    - "op" (torchtitan's per-op selective AC): `op_layer_bytes`.
    """
    if recompute == "op":
        return op_layer_bytes(m, tokens, act_bytes, tp, sp)
    terms = layer_terms(m, tokens, act_bytes, a)
    if recompute == "full":
        return act_bytes * tokens * m.hidden / (tp if sp else 1)
    if recompute == "selective":
        terms = LayerActivations(terms.replicated, terms.sharded, 0.0)
    return terms.total(tp, sp)


def full_layer_bytes(m: ModelSpec, tokens: float, act_bytes: int, tp: int, sp: bool,
                     a: ActivationAssumptions = DEFAULT) -> float:
    """One layer's complete saved set for one micro-batch: what is live while a fully recomputed layer runs
    its backward (the recompute rebuilds it, then the backward consumes it)."""
    return layer_terms(m, tokens, act_bytes, a).total(tp, sp)


def op_recompute_bytes(m: ModelSpec, tokens: float, act_bytes: int, tp: int, sp: bool,
                       a: ActivationAssumptions = DEFAULT) -> float:
    """The transient of a per-op recomputed layer's backward: the recompute rebuilds the layer's complete saved
    set (`full_layer_bytes`), of which the kept part (`op_layer_bytes`) is already held and reused (the cache
    hands its tensors back: torch/utils/checkpoint.py `_CachedTorchDispatchMode`) - except a kept output the
    recompute never replays: the recompute stops once the last saved tensor is rebuilt (non-reentrant early
    stop, `_recomputation_hook` raising `_StopRecomputationError`, on by default), and autograd saves a matmul's
    inputs before running it, so when the block's last matmul is a kept one (SwiGLU's down projection, the 7th)
    its cache entry is neither replayed nor freed until the layer's backward ends: its (T, h) partial sum stays
    beside the rebuilt set (measured: executor/measure.py, tests/test_verify_recompute.py)."""
    kept = op_layer_bytes(m, tokens, act_bytes, tp, sp)
    last_kept = (len(m.layer_matmuls()) - 1) % 2 == 0          # the 1st, 3rd, 5th, 7th ... matmul is kept
    unreplayed = act_bytes * tokens * m.hidden if last_kept else 0.0   # row-parallel: not divided by tp
    return max(0.0, full_layer_bytes(m, tokens, act_bytes, tp, sp, a) - kept) + unreplayed


def recompute_transient_bytes(m: ModelSpec, tokens: float, act_bytes: int, tp: int, sp: bool, recompute: str,
                              a: ActivationAssumptions = DEFAULT) -> float:
    """Bytes one recomputed layer adds, during its backward, to what the layers keep (`layer_bytes`): the
    recompute rebuilds a saved set, minus the kept tensors it reuses (same storages).
    - "full": the layer's complete saved set (`full_layer_bytes`) minus its input, which the checkpoint kept and
      the rebuilt norm saves again (torch.utils.checkpoint; Megatron's CheckpointFunction likewise reruns the
      layer on its saved input).
    - "selective": the attention core rerun on the kept Q, K, V rebuilds its output (a new tensor: the forward's
      is kept by the output projection) and its statistics (FlashAttention's LSE, or without it the scores,
      softmax and dropout of Korthikanti §4.1): act·T·q_dim/tp + the core term / tp.
    - "op": `op_recompute_bytes`. "none": 0."""
    if recompute == "full":
        return full_layer_bytes(m, tokens, act_bytes, tp, sp, a) - layer_bytes(m, tokens, act_bytes, tp, sp, "full", a)
    if recompute == "selective":
        return (act_bytes * tokens * m.q_dim + layer_terms(m, tokens, act_bytes, a).attention_core) / tp
    if recompute == "op":
        return op_recompute_bytes(m, tokens, act_bytes, tp, sp, a)
    return 0.0


# ---- pipeline: micro-batches in flight ------------------------------------------------------------------
def chunk_microbatches_in_flight(schedule: str, pp: int, stage: int, m: int, vpp: int = 1) -> int:
    """Forward passes (of one model chunk for one micro-batch) whose activations stage `stage` holds at its
    peak, i.e. when the first backward starts.

    - AFAB (GPipe, Huang et al. 2019): all m forwards run before any backward.
    - 1F1B (Narayanan et al. 2021 §2.2.1, PipeDream-Flush): stage i runs pp−i−1 warm-up forwards, then one
      more forward before its first backward: min(pp − i, m).
    - Interleaved 1F1B (Narayanan et al. 2021 §2.2.2; Megatron-LM megatron/core/pipeline_parallel/schedules.py,
      forward_backward_pipelining_with_interleaving): (pp − i − 1)·2 + (vpp − 1)·pp warm-up chunk-forwards plus
      one, capped at the m·vpp chunk-forwards of the step. Each holds layers/(pp·vpp) layers, so stage 0 holds
      layers·(1 + (pp−1)/(pp·vpp)) layers' worth: Megatron's theoretical_memory_usage.py penalty factor.
    """
    if schedule == "afab":
        return m * vpp
    if schedule == "interleaved":
        return min(m * vpp, (pp - stage - 1) * 2 + (vpp - 1) * pp + 1)
    return min(pp - stage, m)


def first_chunk_microbatches_in_flight(schedule: str, pp: int, stage: int, m: int, vpp: int = 1) -> int:
    """Micro-batches whose first-chunk (chunk 0) forward has run and whose chunk-0 backward has not, at most, on
    stage `stage`: what holds the inputs of the first chunk (token ids, the embedding-dropout mask on stage 0).

    `chunk_microbatches_in_flight` counts chunk forwards of any chunk at the first backward; under interleaving
    the chunk-0 count peaks later and is not that count scaled by a chunk's share of the layers. Derived from the
    compute orders of spec/schedules.py (Megatron-LM's forward_backward_pipelining_with_interleaving):
    - forwards take chunks in groups of pp micro-batches, so among the first n forwards
      (n // (pp·vpp))·pp + min(n % (pp·vpp), pp) are chunk-0 forwards (Megatron's get_model_chunk_id);
    - backwards take the chunks in reverse order, so the first (vpp − 1)·pp backwards are of chunks > 0 and the
      first chunk-0 backward is backward number (vpp − 1)·pp (0-based);
    - after W warm-up forwards, forward W + k runs just before backward k, so that first chunk-0 backward follows
      n = min(W + (vpp − 1)·pp + 1, m·vpp) forwards; the chunk-0 forwards among them are all alive there.
    Later the count does not exceed that (each pp·vpp window of the steady state has pp chunk-0 forwards and pp
    chunk-0 backwards); not proven here: tests/test_memory_interleaved_ids.py walks the stages' programs and
    counts the live chunk-0 forwards for pp up to 6, vpp up to 4, m up to 5·pp.
    AFAB holds all m; 1F1B (vpp = 1, W = min(pp − stage − 1, m)) gives min(pp − stage, m), as the chunk count.
    """
    if schedule == "afab":
        return m
    if schedule == "interleaved":
        total = m * vpp
        warmup = total if m == pp else min((pp - stage - 1) * 2 + (vpp - 1) * pp, total)
    else:
        vpp, total, warmup = 1, m, min(pp - stage - 1, m)
    n = min(warmup + (vpp - 1) * pp + 1, total)
    group = pp * vpp
    return min(m, (n // group) * pp + min(n % group, pp))
