"""What the executor allocates and sends for a plan, predicted from the spec alone (no torch).

The memory model (simulator/memory.py) and the plan (spec/compile.py) describe a *production* layout: bf16
weights with fp32 master copies, unpadded ZeRO shards in memory, the collectives that dominate (the plan's DP/ZeRO
ops carry the executor's padded units, spec/units.py, shared with this module). The executor is a reference
implementation with its own, documented, layout (executor/dp.py, model.py, tp.py, cp_ring.py, pp_stage.py). To
hold it to exact equality, this module predicts exactly what the executor does, from the spec, by the rules those
files state; `loom verify` prints these predictions next to the plan's and names every difference
(`comm_notes`). Model states are predicted by the memory model itself (`state_notes`).

Executor rules used (each from the named file):
- Parameters (model.py, tp.py; spec/units.py, which the plan compiler uses too): per layer norm1, q, k, v, o, norm2, up, [gate], down in registration order; Q/K/V
  and up/gate split by output rows over tp (biases too), o/down by input columns (their biases replicated);
  embedding and head vocabulary-parallel with the vocabulary padded to a multiple of tp; the Decoder's own
  parameters (pos, head_weight) come before its submodules' in `parameters()` order.
- Units (dp.py; spec/units.py): ZeRO-0/1/2 group parameters in reverse order into buckets that close once their gradient bytes
  reach bucket_MB; ZeRO-3 makes one unit per layer plus one root unit; every unit is padded to a multiple of the
  DP group size (dp, times cp when cp > 1: pp_stage.Stage reduces over dp+cp). One DataParallel per model chunk.
- Model states: no formula here. The state rows compare the executor's measured bytes with the memory model's
  (simulator/memory.py stage_memory), which counts the executor's layout (dp.py: padded units; ZeRO-1 the full
  gradient buffer, reduced in place; ZeRO-2/3 the grad_dtype shard accumulator) - one figure for both;
  `state_notes` would name a difference (none now: bf16 runs Megatron's layout, SGD's momentum is counted).
"""
from __future__ import annotations

from dataclasses import replace

from loom.simulator.activations import ActivationAssumptions, first_chunk_microbatches_in_flight
from loom.spec.units import Param, chunk_tensors, padded_vocab
from loom.spec.units import dp_group_size, stage_chunks, stage_units  # noqa: F401  (re-exported)
from loom.spec.units import rank_chunk_units as chunk_units  # noqa: F401  (re-exported)

F32 = 4
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


def _chunk_params(spec, layers: range, first: bool, last: bool) -> list[Param]:
    """This rank's parameters of one model chunk, in the order `dict.fromkeys(decoder.parameters())` gives."""
    return chunk_tensors(spec.model, spec.plan.tp, spec.plan.sp, layers, first, last)


def state_elements(spec, stage: int) -> dict[str, int]:
    """Parameter elements one rank of `stage` holds, and the same after padding every unit to the DP group."""
    units = [u for us in stage_units(spec, stage) for u in us]
    return {"param_elements": sum(q.numel for u in units for q in u.params),
            "padded_elements": sum(u.numel for u in units)}


def state_notes(spec, key: str) -> str:
    """Why the executor's measured `key` bytes (params, grads, optimizer) may differ from the memory model's
    (simulator/memory.py stage_memory, the row's prediction), naming each rule that applies; "" where the two
    layouts are the same: every precision (bf16/fp16: 2-byte parameters, fp32 masters with the optimizer states,
    executor/dp.py), every ZeRO stage, with or without PP, AdamW, Adam and momentum SGD - so none is named now;
    the row's note stays the place for a future difference."""
    return ""


# ---- collectives -------------------------------------------------------------------------------------------------
def activation_dtypes(spec, device: str = "cpu") -> tuple[int, int]:
    """(lo, hi) bytes per element of what the executor's activation collectives carry. lo: outputs of the linear
    layers and their gradients (autocast); hi: the norm outputs entering a TP region and the embedding output
    leaving one, and their gradients (model.amp_cast casts them to the autocast dtype), and the pipeline messages
    (Stage act_dtype = the autocast dtype). Trainer autocasts bf16/fp16 on CUDA and CPU alike (fp8 as bf16), so
    both are 2 bytes there and fp32 otherwise; `device` no longer matters."""
    if spec.training.precision in ("bf16", "fp16", "fp8"):
        return 2, 2
    return F32, F32


def param_gather_bytes(spec) -> int:
    """Bytes per element of the ZeRO parameter gathers (dp.py param_dtype): the precision's with ZeRO >= 1 over
    more than one rank in bf16/fp16/fp8 (bf16), else fp32."""
    return 2 if spec.training.precision in ("bf16", "fp16", "fp8") and spec.plan.zero >= 1 and dp_group_size(spec) > 1 \
        else F32


def comm_bytes(spec, stage: int, device: str = "cpu") -> dict[str, int]:
    """Bytes per comm row one rank of `stage` sends or passes to collectives in one step (comm.py convention:
    all_reduce the buffer, all_gather/reduce_scatter the full tensor, send the tensor). Rows are `COMM_ROWS`."""
    m, p, t = spec.model, spec.plan, spec.training
    M = spec.micro_batches
    tp, cp = p.tp, p.cp
    sp = p.sp and tp > 1
    lo, hi = activation_dtypes(spec, device)
    T = t.micro_batch * m.seq_len // cp                       # tokens of one micro-batch on one rank
    A = T * m.hidden                                          # elements of one full-sequence activation
    gb = DTYPE_BYTES[t.grad_dtype]
    n_dp = dp_group_size(spec)
    out = {k: 0 for k in COMM_ROWS}
    chunks = stage_chunks(spec, stage)
    units = stage_units(spec, stage)
    full_rc = t.recompute in ("full", "op")     # per-op recompute reruns the same collectives (executor/sac.py)
    for (layers, first, last), cunits in zip(chunks, units):
        n = len(layers)
        emb, head = (1 if first else 0), (1 if last else 0)
        if tp > 1:
            # Per layer and pass two TP regions (attention, MLP), each entered (enter_tp) and left (leave_tp);
            # tp.py: enter = identity fwd / all-reduce bwd (SP: all-gather fwd / reduce-scatter bwd) of the norm
            # output (hi); leave = all-reduce fwd / identity bwd (SP: reduce-scatter fwd / all-gather bwd) of the
            # row-parallel output (lo). The embedding leaves TP once (hi), the LM head input enters once (hi).
            # Full recompute reruns each layer's forward inside the backward, but torch.utils.checkpoint stops the
            # rerun once the last saved tensor is rebuilt (non-reentrant early stop, torch/utils/checkpoint.py
            # `_checkpoint_early_stop`, default on): the MLP's leave (the layer's last collective) is not repeated.
            # With SP the backward all-gathers each entered input again from the shard its linears saved
            # (tp.py column_parallel_linear): 2 per layer and the LM head input (hi).
            if sp:
                ag = 2 * (2 * n + head) * hi + 2 * n * lo + emb * hi + (2 * n * hi if full_rc else 0)
                rs = 2 * n * lo + emb * hi + (2 * n + head) * hi + (n * lo if full_rc else 0)
                out["sp_allgather"] += M * A * ag
                out["sp_reducescatter"] += M * A * rs
            else:
                ar = 2 * n * lo + emb * hi + (2 * n + head) * hi + (n * lo if full_rc else 0)
                out["tp_allreduce"] += M * A * ar
            if last:                                          # vocab-parallel CE: max, target logit, exp-sum
                out["tp_allreduce"] += M * 3 * T * F32        # (the plan lists them as a tp_allreduce op)
        if cp > 1:
            # cp_ring.py: K and V stacked (linear outputs, lo), this rank's local sequence; forward cp-1 K/V hops
            # per layer, backward cp-1 K/V hops and cp-1 dK/dV hops (fp32 accumulator, starting one rank after
            # its owner)
            kv = 2 * (m.n_kv_heads // tp) * T * m.d_head
            fwd = (cp - 1) * kv * lo * (2 if full_rc else 1)
            out["cp_kv_exchange"] += M * n * (fwd + (cp - 1) * kv * lo + (cp - 1) * kv * F32)
        if p.pp > 1:
            s_local = m.seq_len // cp // (tp if sp else 1)
            msg = s_local * t.micro_batch * m.hidden * hi     # Stage's act_dtype: the autocast dtype or fp32
            j_last = len(chunks) * p.pp - 1
            j = chunks.index((layers, first, last)) * p.pp + stage
            out["pp_send_act"] += M * msg if j != j_last else 0
            out["pp_send_grad"] += M * msg if j != 0 else 0
        # ZeRO-2/3 reduce every micro-batch without PP; under PP once per step (dp.py every_micro_batch, set by
        # pp_stage.Stage to pp == 1), as the plan
        per_mb = p.zero >= 2 and p.pp == 1
        reduces = M if per_mb else 1
        if n_dp > 1:
            key = "dp_allreduce" if p.zero == 0 else "dp_reducescatter"
            out[key] += reduces * sum(u.numel for u in cunits) * gb
            pg = param_gather_bytes(spec)
            if p.zero in (1, 2):
                out["zero_allgather"] += sum(u.numel for u in cunits) * pg
            if p.zero == 3 and per_mb:
                layer_units, root = cunits[:-1], cunits[-1]
                # layers: gathered before each forward and again before each backward (prefetched one layer
                # ahead, still once each); root once per micro-batch
                out["zero_allgather"] += M * (2 * sum(u.numel for u in layer_units) + root.numel) * pg
            elif p.zero == 3:                                 # under PP every unit stays gathered for the step
                out["zero_allgather"] += sum(u.numel for u in cunits) * pg
        if sp:
            sp_bytes = sum(q.numel for u in cunits for q in u.params if q.sp_grad) * gb
            sp_reduce = M if per_mb and n_dp > 1 else 1
            out["sp_grad_allreduce"] += sp_reduce * sp_bytes
    # optimizer: the global gradient norm, one fp32 scalar per active group (optim.global_grad_norm)
    norm_groups = [tp] + ([n_dp] if p.zero >= 1 else [])
    if p.pp > 1 or p.cp > 1:
        norm_groups.append(p.pp)                              # pp_stage.Stage.norm_groups adds pp
    out["grad_norm_allreduce"] = sum(F32 for g in norm_groups if g > 1)
    # Trainer.step: the step loss all-reduced over dp (pp = cp = 1), or over dp·cp and over pp (Stage path)
    loss_groups = [p.dp] if p.pp == 1 and p.cp == 1 else [p.dp * p.cp, p.pp]
    out["loss_report"] = sum(F32 for g in loss_groups if g > 1)
    if p.pp > 1 and m.tied_embeddings and (stage == 0 or stage == p.pp - 1):
        out["tied_embedding_allreduce"] = padded_vocab(m.vocab, tp) // tp * m.hidden * gb
    return out


COMM_ROWS = ("tp_allreduce", "sp_allgather", "sp_reducescatter", "cp_kv_exchange", "pp_send_act", "pp_send_grad",
             "dp_allreduce", "dp_reducescatter", "zero_allgather", "sp_grad_allreduce",
             "grad_norm_allreduce", "loss_report", "tied_embedding_allreduce")
PLAN_KINDS = frozenset({"tp_allreduce", "sp_allgather", "sp_reducescatter", "cp_kv_exchange", "pp_send_act",
                        "pp_send_grad", "dp_allreduce", "dp_reducescatter", "zero_allgather"})


def classify(rec: dict) -> str | None:
    """The comm row of one executor record (comm.py / pp_p2p.py); None for receives (counted at the sender). Rows
    follow the plan's op kinds; collectives the plan does not list get their own rows."""
    kind, group, tag = rec["kind"], rec["group"], rec["tag"]
    if kind == "recv":
        return None
    for key in ("dp_allreduce", "dp_reducescatter", "zero_allgather", "sp_grad_allreduce"):
        if f">{key}" in tag:
            return key
    if tag == "loss_report":
        return "loss_report"
    if group == "emb" or tag == "pp.tied_embedding_grad":
        return "tied_embedding_allreduce"
    if kind == "send":
        if group == "cp":
            return "cp_kv_exchange"
        return "pp_send_act" if "SEND_ACT" in tag else "pp_send_grad"
    if tag.startswith("optimizer") and kind == "all_reduce":
        return "grad_norm_allreduce"
    if group == "tp" and kind == "all_gather":
        return "sp_allgather"
    if group == "tp" and kind == "reduce_scatter":
        return "sp_reducescatter"
    if group == "tp" and kind == "all_reduce":
        return "tp_allreduce"                                 # the layers', embedding's, head's and the CE's
    return f"other:{kind}:{group}:{tag}"


def plan_comm_bytes(plan, stage: int) -> dict[str, float]:
    """The plan's payload bytes per comm kind for one rank of `stage` (msg_bytes × count of each op)."""
    out: dict[str, float] = {}
    for op in plan.program(stage):
        if op.group is not None and op.kind.value in PLAN_KINDS:
            out[op.kind.value] = out.get(op.kind.value, 0.0) + op.msg_bytes * op.count
    return out


def comm_notes(spec) -> dict[str, str]:
    """Why the plan's bytes (spec/compile.py) differ from the executor's for each row, where they do."""
    notes = {
        "tp_allreduce": "",
        "sp_allgather": "",
        "sp_reducescatter": "",
        # K/V blocks travel in the autocast dtype (linear outputs), dK/dV in fp32, as the plan counts them
        "cp_kv_exchange": "",
        # DP/ZeRO bytes: the plan counts the executor's padded units (spec/units.py), so they agree exactly
        "dp_allreduce": "",
        "dp_reducescatter": "",
        # bf16/fp16/fp8 with ZeRO >= 1: the executor gathers the rounded 2-byte shards (dp.py param_dtype; fp8
        # runs as bf16), as the plan counts them
        "zero_allgather": "",
        "sp_grad_allreduce": "not in the plan: SP-replicated parameters' gradients summed over tp",
        "grad_norm_allreduce": "not in the plan: one fp32 scalar per group for the global gradient norm",
        "loss_report": "not in the plan: the step loss all-reduced over dp for logging",
        "tied_embedding_allreduce": "not in the plan: tied embedding gradient summed over first and last stage",
    }
    return notes


# ---- activations ----------------------------------------------------------------------------------------------------
# What the executor's kernels keep for backward (kernels/twins.py, the same set as the Triton Functions they
# mirror; executor/tp.py, cp_ring.py), in the memory model's terms (simulator/activations.py):
# - attention: q, k, v (kv heads), out, lse: FlashAttention; out shares its storage with the output projection's
#   input (the kernels write it in q's sequence-first layout);
# - SwiGLU: gate and up (kernels/swiglu.py recomputes the sigmoid) plus its output, saved by the down projection:
#   3 ffn-wide tensors, not eager PyTorch's 4 (Megatron-LM's fused SwiGLUFunction, megatron/core/fusions/
#   fused_bias_swiglu.py, also saves only its input);
# - the norms' fp32 statistics (RMSNorm rstd; F.layer_norm's mean and rstd), which Korthikanti's count leaves out;
# - no dropout; with SP the column-parallel linears keep the input shard (tp.py column_parallel_linear).
# `tests/test_verify.py` holds one process's saved bytes per layer equal to this, to the byte.
EXECUTOR_ACTIVATIONS = ActivationAssumptions(flash_attention=True, dropout=False, swiglu_saved_tensors=3,
                                             norm_statistics=True)


def executor_buffer_extras(spec, stage: int) -> int:
    """Bytes the executor keeps for backward outside the layers beyond the memory model's embedding and logits
    buffers (simulator/memory.py), for the micro-batches the memory model holds there:
    - last stage, per micro-batch whose loss awaits its backward (1, AFAB: all): the final norm's fp32
      statistics (RMSNorm rstd, LayerNorm mean and rstd; on the SP shard) and the vocab-parallel cross-entropy's
      int64 targets and bool in-shard mask (executor/tp.py _VocabParallelCE saves softmax, targets, mask);
    - first stage with tp > 1, per first-chunk forward in flight (as the token ids,
      simulator/activations.py first_chunk_microbatches_in_flight): the vocab-parallel embedding's bool
      out-of-shard mask (tp.py VocabParallelEmbedding: masked_fill saves it)."""
    m, p, t = spec.model, spec.plan, spec.training
    T = t.micro_batch * m.seq_len // p.cp
    out = 0
    if stage == p.pp - 1:
        stats = 1 if m.norm == "rmsnorm" else 2
        last_mbs = spec.micro_batches if p.schedule == "afab" else 1
        out += last_mbs * (F32 * stats * T // (p.tp if p.sp and p.tp > 1 else 1) + 8 * T + 1 * T)
    if stage == 0 and p.tp > 1:
        # the embedding's mask lives as long as the token ids: one per first-chunk forward in flight
        out += first_chunk_microbatches_in_flight(p.schedule, p.pp, 0, spec.micro_batches, p.vpp) * T
    return out


# ---- the loss on CUDA ---------------------------------------------------------------------------------------------
def uses_fused_loss(spec, device: str) -> bool:
    """executor/model.py Decoder.loss_sum: on CUDA without TP the loss is loom.kernels' fused linear cross-entropy
    (the logits are never materialised); on CPU, or with TP, the vocab-parallel cross-entropy that the memory
    model's default "unfused" loss describes."""
    return device.startswith("cuda") and spec.plan.tp == 1


def executor_assumptions(spec, device: str) -> ActivationAssumptions:
    """The memory model's assumptions for what the executor's kernels and loss keep on `device`."""
    if uses_fused_loss(spec, device):
        return replace(EXECUTOR_ACTIVATIONS, loss="fused_chunked")
    return EXECUTOR_ACTIVATIONS
