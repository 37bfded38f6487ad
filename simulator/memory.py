"""Per-GPU memory of a training plan: model states, activations, buffers and overhead, stage by stage.

Model states follow the ZeRO paper (Rajbhandari et al. 2020, §3.1 and §5): mixed precision Adam keeps 2 bytes of
bf16/fp16 parameters, a gradient buffer, and K = 12 bytes of optimizer state per parameter (fp32 master copy 4,
momentum 4, variance 4). Gradients are 4 bytes when `training.grad_dtype = "fp32"` (Megatron-LM accumulates and
reduces in fp32: its 18 bytes/param = 2 + 4 + 12, megatron/training/theoretical_memory_usage.py) and 2 bytes for
"bf16". fp32 training keeps no master copy (params 4, grads 4, Adam 8). SGD is momentum SGD: one fp32 momentum
buffer, 4 bytes per parameter (torch.optim.SGD's momentum_buffer), sharded like Adam's moments.
ZeRO stage 1 shards the optimizer state, stage 2 also the gradients, stage 3 also the parameters (ZeRO §5.1-5.3).
Gradients under ZeRO-1 are the full buffer: the reduce-scatter writes into the buffer's own shard, which the
optimizer reads (Megatron-LM's distributed optimizer, core/distributed/param_and_grad_buffer.py: one fp32 grad
buffer, each bucket reduce-scattered in place). Under ZeRO-2 only the shard accumulator persists; full gradients
exist one bucket at a time during each backward (DeepSpeed ZeRO-2, runtime/zero/stage_1_and_2.py: reduce_bucket_size
buckets reduced as the backward fills them, every micro-batch under accumulation), counted in `_comm_buffers`.
The states are counted over the executor's flat units (spec/units.py), each padded to a multiple of the dp·cp
group (Megatron pads its buffer likewise), so these rows equal what executor/dp.py allocates (loom verify).

Loom shards ZeRO state over dp·cp ranks, not dp alone: context-parallel ranks hold the same parameters and
reduce gradients together, and both Megatron-LM (its distributed optimizer uses the data-parallel group *with*
context parallelism) and torchtitan (FSDP over the dp_shard×cp mesh) shard over that larger group. Shards are
padded up to whole elements per rank (Megatron pads its contiguous buffer to a multiple of the DP size).

Where parameters live (Megatron-LM layout): stage i holds layers/pp layers (vpp chunks of them when
interleaved); the first stage also the input embedding (and learned positions), the last stage the final norm and
the LM head; with tied embeddings and pp > 1 the last stage keeps its own copy of the embedding matrix (Megatron's
"word_embeddings_for_head", kept in sync by an all-reduce of its gradient). Tensor parallelism splits the
attention and MLP weights and their column-parallel biases; norms, row-parallel biases and position embeddings are
replicated; the embedding and head are vocabulary-parallel, with the vocabulary padded up to a multiple of tp
(Megatron pads further, to 128·tp, for speed; Loom pads only as far as the split needs).

Activations: see activations.py. Buffers: see `_comm_buffers`. The numbers are an analytical model, compared
against published measured peaks in benchmarks/memory_accuracy.py (results in docs/measurements.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from loom.spec.compile import split_layers
from loom.spec.units import chunk_tensors, padded_vocab, stage_units
from loom.spec.model import ModelSpec
from loom.spec.spec import Spec

from .activations import (DEFAULT, FP32, MASK_BYTES, TOKEN_ID_BYTES, ActivationAssumptions,
                          chunk_microbatches_in_flight, first_chunk_microbatches_in_flight, fused_ce_chunk_tokens,
                          layer_bytes, recompute_transient_bytes)

MiB = 2**20
GiB = 2**30

# Framework overhead, stated not fitted:
# - CUDA context plus library workspaces (cuBLAS/cuDNN handles, NCCL communicator buffers): the PyTorch CUDA
#   context alone takes roughly 0.3-0.6 GiB on an H100 (depends on the CUDA version and lazy module loading),
#   NCCL's default 4 MiB buffers per channel and peer and the cuBLAS workspaces add a few hundred MiB: 1 GiB.
#   This memory is not seen by torch.cuda.max_memory_reserved(). Not counted on the "cpu" device.
CUDA_CONTEXT_BYTES = 1 * GiB
# - Caching-allocator fragmentation: 5 % on top of what is allocated, Megatron-LM's own allowance
#   ("overhead_factor = 1.05", megatron/training/theoretical_memory_usage.py).
FRAGMENTATION = 0.05


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of pipeline stage `stage` (all its tp/dp/cp ranks hold the same)."""
    stage: int
    layers: int                    # transformer layers on this stage (all its virtual chunks together)
    microbatches_in_flight: float  # micro-batches of the whole stage whose activations are held at the peak
    params: int
    grads: int
    optimizer: int
    activations: int               # transformer layers' saved activations, all micro-batches in flight
    embedding_buffers: int         # first stage: token ids (and embedding dropout masks) per micro-batch in flight
    logits_buffers: int            # last stage: final-norm tensors and fp32 log-probs per micro-batch in flight
    workspace: int                 # the largest transient: loss backward, or a recomputed layer (any recompute)
    comm_buffers: int              # DP gradient buckets, ZeRO-3 gathered parameters/gradients, CP ring K/V
    overhead: int                  # CUDA context + allocator fragmentation
    peak: int

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MemoryReport:
    per_stage: list[StageMemory]
    peak_bytes: int
    hbm_bytes: int
    fits: bool
    headroom_bytes: int            # hbm_bytes − peak_bytes (negative when it does not fit)
    gpu: str

    @property
    def peak_stage(self) -> StageMemory:
        return max(self.per_stage, key=lambda s: s.peak)

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "hbm_bytes": self.hbm_bytes, "fits": self.fits,
                "headroom_bytes": self.headroom_bytes, "gpu": self.gpu,
                "per_stage": [s.to_dict() for s in self.per_stage]}


# ---- bytes per element ---------------------------------------------------------------------------------
def param_bytes(precision: str) -> int:
    """Bytes of the working parameter copy. fp8 training (Transformer Engine, torchao float8) keeps bf16
    weights and casts them to fp8 on the fly, so fp8 counts as 2."""
    return 4 if precision == "fp32" else 2


def activation_bytes(precision: str) -> int:
    """Saved activations are stored in bf16 under bf16/fp8 mixed precision (fp8 copies are transient)."""
    return 4 if precision == "fp32" else 2


def grad_bytes(spec: Spec) -> int:
    """training.grad_dtype: the accumulation and reduction buffers (fp32 by default, as Megatron-LM; the plan's
    DP bytes and the executor's buffers use the same dtype, whatever the precision)."""
    return 4 if spec.training.grad_dtype == "fp32" else 2


def optimizer_bytes(spec: Spec) -> int:
    """ZeRO §3.1 'K': fp32 master copy (mixed precision only) + the optimizer's fp32 state: Adam's two moments
    (8), or SGD's momentum buffer (4: torch.optim.SGD keeps state['momentum_buffer'] per parameter when momentum
    != 0; Loom's "sgd" is momentum SGD, executor/optim.py, momentum 0.9)."""
    master = 0 if spec.training.precision == "fp32" else 4
    moments = 4 if spec.training.optimizer == "sgd" else 8
    return master + moments


# ---- parameters per GPU ----------------------------------------------------------------------------------
def layer_params_per_gpu(m: ModelSpec, tp: int) -> int:
    """One layer's parameters on one TP rank: weights and column-parallel biases split, the rest replicated."""
    h, f, q, kv = m.hidden, m.ffn_hidden, m.q_dim, m.kv_dim
    n_in = 2 if m.gated else 1
    split = h * q + 2 * h * kv + q * h + (n_in + 1) * h * f          # Wq, Wk, Wv, Wo, MLP weights
    replicated = 2 * m.norm_params()
    if m.bias:
        split += q + 2 * kv + n_in * f                                  # column-parallel biases
        replicated += 2 * h                                             # row-parallel biases (Wo, down/fc2)
    assert split % tp == 0, "validated specs have tp dividing heads, kv_heads and ffn_hidden"
    return split // tp + replicated


def stage_chunk_layers(m: ModelSpec, pp: int, vpp: int, stage: int) -> list[int]:
    """Layers of each virtual chunk of a stage: chunk j of stage s is virtual stage j·pp + s, split exactly as
    the plan compiler splits them (even, or the Llama 3 split with parallel.uneven_split)."""
    ranges = split_layers(m.layers, pp * vpp)
    return [len(ranges[j * pp + stage]) for j in range(vpp)]


def stage_layers(m: ModelSpec, pp: int, stage: int, vpp: int = 1) -> int:
    return sum(stage_chunk_layers(m, pp, vpp, stage))


def stage_params_per_gpu(m: ModelSpec, pp: int, tp: int, stage: int, vpp: int = 1) -> int:
    """Parameters of pipeline stage `stage` on one TP rank, before any ZeRO sharding."""
    n = stage_layers(m, pp, stage, vpp) * layer_params_per_gpu(m, tp)
    table = padded_vocab(m.vocab, tp) // tp * m.hidden                 # vocabulary-parallel embedding shard
    if stage == 0:
        n += table + (m.seq_len * m.hidden if m.position == "learned" else 0)
    if stage == pp - 1:
        n += m.norm_params()
        if not m.tied_embeddings or pp > 1:
            n += table                                                  # the head, or the tied copy (pp > 1)
    return n


def _units_per_gpu(m: ModelSpec, pp: int, tp: int, stage: int, vpp: int = 1) -> list[int]:
    """The separately gathered pieces under ZeRO-3 (FSDP wraps each layer, the embedding and the head)."""
    table = padded_vocab(m.vocab, tp) // tp * m.hidden
    units = [layer_params_per_gpu(m, tp)] if stage_layers(m, pp, stage, vpp) else []
    if stage == 0:
        units.append(table + (m.seq_len * m.hidden if m.position == "learned" else 0))
    if stage == pp - 1 and (not m.tied_embeddings or pp > 1):
        units.append(table + m.norm_params())
    return units


def _shard(n: int, ways: int) -> int:
    return -(-n // ways)


_PADDED: dict = {}          # memo for the search's hot loop: (model id, layout, stage) -> padded elements


def stage_padded_elements(spec: Spec, stage: int) -> int:
    """Elements of a stage's flat units after padding each to a multiple of dp·cp (spec/units.py stage_units, the
    grouping executor/dp.py and the plan's DP ops use): parameters plus < dp·cp padding elements per unit."""
    p, m = spec.plan, spec.model
    shard = p.dp * p.cp
    if shard == 1:
        return stage_params_per_gpu(m, p.pp, p.tp, stage, p.vpp)
    gb = grad_bytes(spec)
    key = (id(m), p.tp, p.sp, p.zero, p.bucket_MB, gb, shard, p.pp, p.vpp, p.uneven_split, stage)
    n = _PADDED.get(key)
    if n is None:
        if len(_PADDED) > 50_000:
            _PADDED.clear()
        n = _PADDED[key] = sum(u.numel for chunk in stage_units(spec, stage) for u in chunk)
        _PADDED[("keep", id(m))] = m           # keep the model alive while its id keys the memo
    return n


# ---- buffers ---------------------------------------------------------------------------------------------
def _comm_buffers(spec: Spec, stage: int, tokens: float) -> int:
    """Communication buffers beyond the model states.

    - ZeRO 0-2 with dp·cp > 1: gradient buckets, 2 × bucket_MB (one being filled while the previous one is
      reduced: PyTorch DDP's bucketing, Li et al. 2020 §3.2.3; Megatron's overlapped grad reduce).
    - ZeRO-3: the gathered parameters of the layer being computed plus the prefetched next one (the two largest
      FSDP units of the stage), and one unit's unsharded gradient before its reduce-scatter (FSDP, Zhao et al.
      2023 §3.2; ZeRO §5.3). Counted even when dp·cp = 1: FSDP still materialises unsharded parameters.
    - ZeRO-3 with pp > 1: a stage runs many micro-batches per step, and re-gathering its parameters for each
      would multiply all-gather traffic by m, so the gathered parameters stay unsharded for the whole step and
      gradients accumulate unsharded until the last micro-batch's reduce-scatter (torchtitan's FSDP under
      pipeline parallelism: reshard_after_forward is off when pp is on, and torch.distributed.pipelining only
      syncs gradients on the last backward; DeepSpeed forbids ZeRO-2/3 with PP for this reason). So the whole
      stage's parameters (param bytes) and gradients (grad bytes) are counted unsharded. ZeRO-2 reduce-scatters
      every micro-batch under PP as without it (DeepSpeed ZeRO-2's buckets; the plan compiler's rule), so it
      keeps the two buckets - except that under PP with tied embeddings the chunk holding the table (first and
      last stage) reduces once per step (spec/compile.py per_micro_batch_reduction): its full gradients too.
    - CP > 1: ring attention's send and receive K/V blocks, 2 × (K + V) of the local sequence (Liu et al. 2023,
      Ring Attention; Megatron/TE's context-parallel attention double-buffers them).
    """
    p, t, m = spec.plan, spec.training, spec.model
    total = 0.0
    if p.zero == 3 and p.pp > 1:
        # Under pipelining the plan reduces ZeRO-3 gradients once per step (compile.py), so the stage's
        # gradients accumulate unsharded, and its parameters stay gathered.
        n = stage_params_per_gpu(m, p.pp, p.tp, stage, p.vpp)
        total += n * (param_bytes(t.precision) + grad_bytes(spec))
    elif p.zero == 3:
        units = sorted(_units_per_gpu(m, p.pp, p.tp, stage, p.vpp), reverse=True)
        total += sum(units[:2]) * param_bytes(t.precision) + units[0] * grad_bytes(spec)
    elif p.dp * p.cp > 1:
        total += 2 * p.bucket_MB * MiB
        if p.zero == 2 and p.pp > 1 and m.tied_embeddings and stage in (0, p.pp - 1):
            v = p.vpp
            j = 0 if stage == 0 else p.pp * v - 1           # the chunk holding the table (or its copy)
            layers = split_layers(m.layers, p.pp * v)[j]
            total += grad_bytes(spec) * sum(q.numel for q in chunk_tensors(m, p.tp, p.sp, range(len(layers)),
                                                                            j == 0, j == p.pp * v - 1))
    if p.cp > 1:
        total += 2 * 2 * tokens * m.kv_dim / p.tp * activation_bytes(t.precision)
    return int(total)


def _logits_bytes(m: ModelSpec, tokens: float, tp: int, sp: bool, act: int,
                  a: ActivationAssumptions = DEFAULT) -> tuple[float, float]:
    """Last stage, per micro-batch in flight (saved until the backward) and as a one-off transient at the loss
    backward, for the loss implementation `a.loss`. Below T = tokens, v = the padded vocabulary / tp (the head is
    vocabulary-parallel) and L = 4·T·v, the fp32 (T, v) logits.

    Saved by the final norm and the head (Korthikanti §4.3, Megatron's 4·sbh·(1 + v/h) for the output layer): the
    norm's input and output, act·T·h each, sharded over tp under SP - except that with `a.sp_gathered_head_input`
    the head saves its all-gathered input, act·T·h (DTensor ColwiseParallel(input_layouts=Shard(1)): the input is
    redistributed to Replicate before the matmul, which saves it for the weight gradient; torchtitan's "output"
    plan, torchtitan/parallelisms/parallelize_llama.py @d4c86e37 apply_tp).

    The loss, by implementation (each one's backward moment is its larger one, so the transient is that moment's):
    - "unfused" (F.cross_entropy on `pred.flatten(0, 1).float()`, torchtitan's loss_fn, nanoGPT likewise): saved:
      the fp32 log-probs, L (log_softmax's backward reads its output). Backward: nll_loss's gradient (zeros plus
      a scatter) and log_softmax's, L each, beside the saved L: transient 2L. (Forward: the bf16 logits, the fp32
      copy and the log-probs, 2.5L; torchtitan frees the bf16 logits before the backward: train.py `del pred`.)
    - "loss_parallel" (torch/distributed/tensor/parallel/loss.py, torchtitan's loss under TP): saved: the log-probs,
      L. Its backward (`_nll_loss_and_log_softmax_backward`) fuses log_softmax's: grad_input = zeros_like(x), then
      (grad_input + exp(x)) * grad_output, so grad_input, exp(x) and their sum (then the product) coexist with the
      saved x: transient 3L. (Forward `_log_softmax`: the bf16 logits, x, shifted and exp(shifted): 3.5L.)
    - "compiled" (torch.compile of that loss: AOTAutograd's min-cut partitioner over inductor's decompositions):
      the forward saves the bf16 logits, act·T·v, and two fp32 values per row (the max and the log-sum-exp), and
      the backward kernel recomputes the softmax and writes only the logits' gradient, act·T·v, plus one fp32
      value per row: transient act·T·v + 4·T. (Forward: nothing (T, v)-sized beyond the logits.)
    - "fused_chunked" (kernels/fused_linear_ce.py, Liger-Kernel's approach): the gradients are computed in the
      forward, chunk by chunk of c tokens (a chunk's logits at most 256 MiB, `fused_ce_chunk_tokens`), so the
      head's input (the norm's output) is consumed, not saved; kept until the backward: grad_h, act·T·h, and
      grad_W, v·h in the weight's dtype (act bytes: the memory model's parameter and activation bytes agree);
      transient: one chunk's logits, act·c·v.
    Megatron's fused vocab-parallel cross-entropy needs less than "unfused". The first three are checked against
    the torch sources run on CPU in tests/test_memory_model.py.
    """
    v = padded_vocab(m.vocab, tp) / tp
    norm_in = act * tokens * m.hidden / (tp if sp else 1)
    head_in = act * tokens * m.hidden if (sp and a.sp_gathered_head_input) else norm_in
    L = FP32 * tokens * v
    if a.loss == "compiled":
        return norm_in + head_in + act * tokens * v + 2 * FP32 * tokens, act * tokens * v + FP32 * tokens
    if a.loss == "fused_chunked":
        chunk = fused_ce_chunk_tokens(int(tokens), int(v), act)
        return norm_in + act * tokens * m.hidden + act * v * m.hidden, act * chunk * v
    transient = 3 * L if a.loss == "loss_parallel" else 2 * L
    return norm_in + head_in + L, transient


# ---- the report --------------------------------------------------------------------------------------------
def stage_memory(spec: Spec, stage: int, assumptions: ActivationAssumptions = DEFAULT) -> StageMemory:
    p, t, m = spec.plan, spec.training, spec.model
    shard = p.dp * p.cp
    n = stage_padded_elements(spec, stage)             # a multiple of dp·cp: every shard is n / (dp·cp)
    params = (n // shard if p.zero == 3 else n) * param_bytes(t.precision)
    grads = (n // shard if p.zero >= 2 else n) * grad_bytes(spec)
    optimizer = (n // shard if p.zero >= 1 else n) * optimizer_bytes(spec)

    act = activation_bytes(t.precision)
    tokens = m.seq_len / p.cp * t.micro_batch          # tokens of one micro-batch on one rank
    layers = stage_layers(m, p.pp, stage, p.vpp)
    chunk_layers = max(stage_chunk_layers(m, p.pp, p.vpp, stage))   # uneven split: the heaviest chunk bounds it
    m_steps = spec.micro_batches
    chunk_fwds = chunk_microbatches_in_flight(p.schedule, p.pp, stage, m_steps, p.vpp)
    in_flight = chunk_fwds * chunk_layers / layers if layers else 0.0      # in whole-stage micro-batches
    per_layer = layer_bytes(m, tokens, act, p.tp, p.sp, t.recompute, assumptions)
    activations = chunk_fwds * chunk_layers * per_layer

    embedding = 0.0
    if stage == 0:
        # token ids, int64; with dropout the embedding-dropout mask (Korthikanti §4.3: sbh·p/t with SP): the first
        # chunk's inputs, held from its forward to its backward, per micro-batch (interleaved: more than the
        # chunk-forward count scaled to whole stages, e.g. 4 where ceil(2.5) = 3 on pp2 vpp2 m4)
        ids_mbs = first_chunk_microbatches_in_flight(p.schedule, p.pp, stage, m_steps, p.vpp)
        embedding = ids_mbs * (TOKEN_ID_BYTES * tokens
                               + (MASK_BYTES * tokens * m.hidden / (p.tp if p.sp else 1)
                                  if assumptions.dropout else 0))
    logits = workspace = 0.0
    if stage == p.pp - 1:
        saved, transient = _logits_bytes(m, tokens, p.tp, p.sp, act, assumptions)
        last_mbs = m_steps if p.schedule == "afab" else 1                 # 1F1B: the last stage holds one
        logits = last_mbs * saved
        workspace = transient
    if layers:                                  # one recomputed layer rebuilds what it did not keep
        workspace = max(workspace, recompute_transient_bytes(m, tokens, act, p.tp, p.sp, t.recompute, assumptions))

    comm = _comm_buffers(spec, stage, tokens)
    allocated = params + grads + optimizer + activations + embedding + logits + workspace + comm
    context = CUDA_CONTEXT_BYTES if spec.gpu.device == "cuda" else 0     # the CPU target has no CUDA context
    overhead = context + FRAGMENTATION * allocated
    return StageMemory(stage=stage, layers=layers, microbatches_in_flight=in_flight, params=int(params),
                       grads=int(grads), optimizer=int(optimizer), activations=int(activations),
                       embedding_buffers=int(embedding), logits_buffers=int(logits), workspace=int(workspace),
                       comm_buffers=comm, overhead=int(overhead), peak=int(allocated + overhead))


def memory_report(spec: Spec, assumptions: ActivationAssumptions = DEFAULT) -> MemoryReport:
    """Memory per GPU of every pipeline stage of a validated spec with a concrete parallel plan."""
    stages = [stage_memory(spec, i, assumptions) for i in range(spec.plan.pp)]
    gpu = spec.gpu
    peak = max(s.peak for s in stages)
    return MemoryReport(per_stage=stages, peak_bytes=peak, hbm_bytes=gpu.hbm_bytes, fits=peak <= gpu.hbm_bytes,
                        headroom_bytes=gpu.hbm_bytes - peak, gpu=gpu.name)
