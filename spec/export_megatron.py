"""`loom export --to megatron`: the spec as Megatron-LM command-line arguments (names checked at Megatron-LM
d98e8a64; the mapping of ZeRO stages is in loom.spec.export's docstring)."""
from __future__ import annotations

import shlex

from .compile import split_layers
from .errors import SpecError, SpecIssue
from .export import LR_STYLE, _check_plan, _train_iters, _uneven_matches, _weighted_split
from .model import ModelSpec
from .spec import Spec

# Every flag export_megatron may emit, verified in Megatron-LM at d98e8a64 (see the module docstring).
MEGATRON_FLAGS = frozenset("""
--tensor-model-parallel-size --pipeline-model-parallel-size --num-layers-per-virtual-pipeline-stage
--context-parallel-size --sequence-parallel --use-distributed-optimizer --use-megatron-fsdp
--data-parallel-sharding-strategy --recompute-granularity --recompute-method --recompute-num-layers
--micro-batch-size --global-batch-size --num-layers --hidden-size --num-attention-heads --group-query-attention
--num-query-groups --ffn-hidden-size --kv-channels --seq-length --max-position-embeddings --vocab-size
--make-vocab-size-divisible-by --swiglu --normalization --norm-epsilon --position-embedding-type --rotary-base
--disable-bias-linear --untie-embeddings-and-output-weights --bf16 --fp16 --fp8-format --grad-reduce-in-bf16
--optimizer --lr --min-lr --lr-decay-style --lr-warmup-iters --lr-wsd-decay-iters --weight-decay --clip-grad
--train-iters --seed --use-tp-pp-dp-mapping --num-virtual-stages-per-pipeline-rank
--account-for-embedding-in-pipeline-split --account-for-loss-in-pipeline-split
--tp-comm-overlap --overlap-grad-reduce --overlap-param-gather
""".split())

_MEGATRON_ORDERS = {("pp", "dp", "cp", "tp"): [], ("dp", "pp", "cp", "tp"): ["--use-tp-pp-dp-mapping"]}


# ---- Megatron-LM -----------------------------------------------------------------------------------------
def megatron_args(spec: Spec) -> tuple[list[str], list[str]]:
    """(arguments, notes): the argv for Megatron-LM's pretrain_gpt.py and what could not be mapped exactly."""
    _check_plan(spec, "Megatron-LM")
    m, t, p = spec.model, spec.training, spec.plan
    if t.recompute == "op":
        # Megatron-LM's selective recompute picks modules (--recompute-modules core_attn, mlp, layernorm, ...),
        # not every other matmul: there is no equivalent of torchtitan's per-op policy.
        raise SpecError([SpecIssue("training.recompute", "op",
                                   "Megatron-LM has no per-op selective recompute (torchtitan's policy).",
                                   'use recompute = "selective" or "full" for a Megatron-LM export.')])
    a: list[str] = []
    notes: list[str] = []

    def add(flag: str, value: object = None) -> None:
        a.append(flag)
        if value is not None:
            a.append(str(value))

    # model (megatron/core/transformer/transformer_config.py; arguments.py "network size")
    add("--num-layers", m.layers)
    add("--hidden-size", m.hidden)
    add("--num-attention-heads", m.heads)
    if m.n_kv_heads != m.heads:
        add("--group-query-attention")
        add("--num-query-groups", m.n_kv_heads)
    add("--ffn-hidden-size", m.ffn_hidden)
    if m.head_dim is not None:
        add("--kv-channels", m.head_dim)
    add("--seq-length", m.seq_len)
    add("--max-position-embeddings", m.seq_len)
    add("--vocab-size", m.vocab)
    add("--make-vocab-size-divisible-by", 128)     # Megatron pads the vocabulary to 128·tp (Loom's assumption)
    if m.activation == "swiglu":
        add("--swiglu")
    add("--normalization", "RMSNorm" if m.norm == "rmsnorm" else "LayerNorm")
    add("--norm-epsilon", m.norm_eps)
    add("--position-embedding-type", "rope" if m.position == "rope" else "learned_absolute")
    # emitted for learned positions too (Megatron ignores it there) so that the export round-trips exactly
    if m.rope_theta != int(m.rope_theta):
        notes.append(f"--rotary-base is an int in Megatron-LM; rope_theta {m.rope_theta} rounded")
    add("--rotary-base", int(round(m.rope_theta)))
    if not m.bias:
        add("--disable-bias-linear")
    if not m.tied_embeddings:
        add("--untie-embeddings-and-output-weights")

    # parallelism (megatron/core/model_parallel_config.py; arguments.py "distributed")
    add("--tensor-model-parallel-size", p.tp)
    add("--pipeline-model-parallel-size", p.pp)
    chunks = p.pp * (p.vpp if p.schedule == "interleaved" else 1)
    uneven = p.pp > 1 and m.layers % chunks != 0
    if p.schedule == "interleaved":
        if uneven:
            add("--num-virtual-stages-per-pipeline-rank", p.vpp)
        else:
            add("--num-layers-per-virtual-pipeline-stage", m.layers // (p.pp * p.vpp))
    if uneven:
        # Loom's uneven split (first and last virtual stage lighter) = Megatron counting the embedding and the
        # loss as one layer each, when that split is the same
        add("--account-for-embedding-in-pipeline-split")
        add("--account-for-loss-in-pipeline-split")
        if not _uneven_matches(m.layers, chunks):
            notes.append(f"Megatron's weighted split {_weighted_split(m.layers, chunks)} differs from Loom's "
                         f"{[len(r) for r in split_layers(m.layers, chunks)]}: set --pipeline-model-parallel-layout "
                         "to match exactly")
    if p.schedule == "afab" and p.pp > 1:
        notes.append("Megatron-LM has no all-forward-all-backward pipeline schedule: it runs 1F1B "
                     "(same bubble, less activation memory)")
    add("--context-parallel-size", p.cp)
    if p.sp:
        add("--sequence-parallel")
    if p.tp_comm_overlap:
        # TransformerEngine userbuffers TP/GEMM overlap (core/model_parallel_config.py tp_comm_overlap); Megatron
        # asserts --sequence-parallel with it, which validation requires and is emitted above
        add("--tp-comm-overlap")
    if p.overlap_param_gather:
        # Megatron asserts --overlap-grad-reduce with it (arguments.py); Loom's DP buckets overlap the backward
        # the same way (docs/plan_ir.md)
        add("--overlap-grad-reduce")
        add("--overlap-param-gather")
    if p.zero == 1:
        add("--use-distributed-optimizer")
    elif p.zero in (2, 3):
        add("--use-megatron-fsdp")
        add("--data-parallel-sharding-strategy", "optim_grads" if p.zero == 2 else "optim_grads_params")
    if tuple(p.mesh) in _MEGATRON_ORDERS:
        a += _MEGATRON_ORDERS[tuple(p.mesh)]
    else:
        notes.append(f"mesh {list(p.mesh)} has no Megatron-LM equivalent (rank orders tp-cp-ep-dp-pp or, with "
                     "--use-tp-pp-dp-mapping, tp-cp-ep-pp-dp): Megatron's default order is used")
    if t.recompute == "selective":
        add("--recompute-granularity", "selective")
    elif t.recompute == "full":
        add("--recompute-granularity", "full")
        add("--recompute-method", "uniform")
        add("--recompute-num-layers", 1)

    # batch, precision, optimizer (megatron/training/config/training_config.py, core/optimizer/optimizer_config.py)
    add("--micro-batch-size", t.micro_batch)
    add("--global-batch-size", t.global_batch)
    if t.precision in ("bf16", "fp8"):
        add("--bf16")
    elif t.precision == "fp16":
        add("--fp16")
    if t.precision == "fp8":
        add("--fp8-format", "hybrid")     # e4m3 forward, e5m2 gradients (Transformer Engine's usual recipe)
    if t.grad_dtype == "bf16":
        add("--grad-reduce-in-bf16")
    add("--optimizer", "sgd" if t.optimizer == "sgd" else "adam")   # Megatron's "adam" is AdamW (decoupled decay)
    if t.optimizer == "adam" and t.weight_decay:
        notes.append("Megatron-LM's adam applies decoupled weight decay (AdamW)")
    add("--lr", t.lr)
    add("--min-lr", t.min_lr)
    add("--lr-decay-style", LR_STYLE[t.lr_schedule])
    add("--lr-warmup-iters", t.warmup_steps)
    add("--weight-decay", t.weight_decay)
    add("--clip-grad", t.grad_clip)
    iters = _train_iters(spec)
    if iters:
        add("--train-iters", iters)
        if t.lr_schedule == "wsd":
            add("--lr-wsd-decay-iters", max(1, round(t.decay_fraction * iters)))
    add("--seed", t.seed)
    return a, notes


def export_megatron(spec: Spec) -> str:
    """Megatron-LM arguments, one flag per line, ready to paste after `torchrun ... pretrain_gpt.py`."""
    args, notes = megatron_args(spec)
    lines = [f"# Megatron-LM arguments for {spec.model.name} on {spec.world_size} × {spec.gpu.name} "
             f"(dp = {spec.plan.dp} is implied: world size / (tp·pp·cp))"]
    lines += [f"# note: {n}" for n in notes]
    i = 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            lines.append(f"{args[i]} {shlex.quote(args[i + 1])} \\")
            i += 2
        else:
            lines.append(f"{args[i]} \\")
            i += 1
    lines[-1] = lines[-1].removesuffix(" \\")
    return "\n".join(lines) + "\n"


def parse_megatron_args(text: str) -> dict[str, object]:
    """Our own Megatron output back to {flag name with underscores: value (str) or True}; comments skipped."""
    body = " ".join(line.rstrip("\\").strip() for line in text.splitlines() if not line.lstrip().startswith("#"))
    tokens = shlex.split(body)
    out: dict[str, object] = {}
    i = 0
    while i < len(tokens):
        key = tokens[i].removeprefix("--").replace("-", "_")
        if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            out[key] = tokens[i + 1]
            i += 2
        else:
            out[key] = True
            i += 1
    return out


def overlaps_from_megatron(args: dict[str, object]) -> dict[str, bool]:
    """The parallel overlap options the Megatron arguments set (the inverse of their half of megatron_args)."""
    return {"tp_comm_overlap": bool(args.get("tp_comm_overlap")),
            "overlap_param_gather": bool(args.get("overlap_param_gather"))}


def model_from_megatron(args: dict[str, object], name: str = "custom") -> ModelSpec:
    """The ModelSpec the Megatron arguments describe (the inverse of the model half of megatron_args)."""
    heads = int(args["num_attention_heads"])
    return ModelSpec(
        name=name, layers=int(args["num_layers"]), hidden=int(args["hidden_size"]), heads=heads,
        kv_heads=int(args["num_query_groups"]) if args.get("group_query_attention") else None,
        ffn_hidden=int(args["ffn_hidden_size"]), vocab=int(args["vocab_size"]), seq_len=int(args["seq_length"]),
        head_dim=int(args["kv_channels"]) if "kv_channels" in args else None,
        activation="swiglu" if args.get("swiglu") else "gelu",
        norm="rmsnorm" if args["normalization"] == "RMSNorm" else "layernorm",
        position="rope" if args["position_embedding_type"] == "rope" else "learned",
        bias=not args.get("disable_bias_linear", False),
        tied_embeddings=not args.get("untie_embeddings_and_output_weights", False),
        rope_theta=float(args.get("rotary_base", 10000)), norm_eps=float(args["norm_epsilon"]))


