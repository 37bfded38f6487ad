"""`loom export`: a spec's model and plan as Megatron-LM arguments or a torchtitan job config (TOML).

Names were checked against the frameworks' own sources:
- Megatron-LM `megatron/training/arguments.py` at d98e8a64 (2026-08-22), whose arguments are partly generated from
  config dataclasses (`ArgumentGroupFactory`, `megatron/training/argument_utils.py`: field `foo_bar` becomes
  `--foo-bar`; a bool defaulting to True becomes `--no-foo-bar`/`--disable-foo-bar`, or its `argparse_meta` name),
  i.e. `megatron/core/transformer/transformer_config.py`, `megatron/core/model_parallel_config.py`,
  `megatron/training/config/{training_config,common_config}.py`. `MEGATRON_FLAGS` lists every flag emitted here.
- torchtitan `torchtitan/config/job_config.py` at e347b1e5 (2026-02-15), the last version configured by TOML
  (later commits moved to Python config functions). Its `ConfigManager._dict_to_dataclass` rejects unknown keys,
  so only real keys are emitted (`TORCHTITAN_KEYS`); the model's dimensions, which torchtitan takes from a named
  flavor (`torchtitan/models/llama3/__init__.py`, `llama3_args`), are given as a `TransformerModelArgs(...)`
  entry to register, in a comment.

How Loom's ZeRO stages map:
- Megatron-LM: zero 1 -> `--use-distributed-optimizer` (optimizer state and fp32 master weights sharded over DP,
  gradients reduce-scattered). zero 2 / 3 -> Megatron-FSDP (`--use-megatron-fsdp`) with
  `--data-parallel-sharding-strategy optim_grads` / `optim_grads_params`.
- torchtitan has FSDP2 (`fully_shard`) over `data_parallel_shard_degree` and DDP over
  `data_parallel_replicate_degree`: zero 3 -> shard = dp (FSDP2 reshards parameters after forward = ZeRO-3);
  zero 2 -> shard = dp with `fsdp_reshard_after_forward = "never"` (parameters stay gathered from forward to
  backward: ZeRO-2's memory and traffic); zero 1 -> the same as zero 2 (approximation: torchtitan has no
  optimizer-only sharding; ZeRO-2 holds less memory than ZeRO-1 with the same reduce-scatter + all-gather
  traffic); zero 0 -> replicate = dp (DDP).
"""
from __future__ import annotations

import math
import re
import shlex
import tomllib

from .compile import split_layers
from .errors import SpecError, SpecIssue
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
""".split())

# Every [section] key export_torchtitan may emit, present in torchtitan's job_config.py at e347b1e5.
TORCHTITAN_KEYS: dict[str, frozenset[str]] = {
    "job": frozenset({"description"}),
    "model": frozenset({"name", "flavor", "converters"}),
    "optimizer": frozenset({"name", "lr", "weight_decay"}),
    "lr_scheduler": frozenset({"warmup_steps", "decay_ratio", "decay_type", "min_lr_factor"}),
    "training": frozenset({"local_batch_size", "global_batch_size", "seq_len", "max_norm", "steps",
                           "mixed_precision_param"}),
    "parallelism": frozenset({"data_parallel_replicate_degree", "data_parallel_shard_degree",
                              "fsdp_reshard_after_forward", "tensor_parallel_degree", "enable_async_tensor_parallel",
                              "pipeline_parallel_degree", "pipeline_parallel_schedule",
                              "pipeline_parallel_layers_per_stage", "pipeline_parallel_microbatch_size",
                              "pipeline_parallel_first_stage_less_layers",
                              "pipeline_parallel_last_stage_less_layers", "context_parallel_degree"}),
    "activation_checkpoint": frozenset({"mode", "selective_ac_option"}),
    "debug": frozenset({"seed"}),
}

_MEGATRON_ORDERS = {("pp", "dp", "cp", "tp"): [], ("dp", "pp", "cp", "tp"): ["--use-tp-pp-dp-mapping"]}
_TT_SCHEDULES = {"afab": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B"}   # torch.distributed.pipelining
_LR_STYLE = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}


def _weighted_split(layers: int, chunks: int) -> list[int]:
    """Layers per virtual stage when the embedding and the loss/head each count as one layer, extra layers going
    to the first stages: torchtitan's generate_llm_fqn_per_model_part (torchtitan/distributed/pipeline_parallel.py,
    input_weight = output_weight = 1) and Megatron-LM's --account-for-{embedding,loss}-in-pipeline-split."""
    per, extra = divmod(layers + 2, chunks)
    counts = [per + (1 if k < extra else 0) for k in range(chunks)]
    counts[0] -= 1
    counts[-1] -= 1
    return counts


def _uneven_matches(layers: int, chunks: int) -> bool:
    """Whether the frameworks' weighted split gives exactly Loom's uneven split (compile.split_layers)."""
    return _weighted_split(layers, chunks) == [len(r) for r in split_layers(layers, chunks)]


def _train_iters(spec: Spec) -> int | None:
    t = spec.training.tokens
    return max(1, math.ceil(t / spec.tokens_per_step)) if t else None


def _check_plan(spec: Spec, target: str) -> None:
    if spec.parallel == "auto":
        raise SpecError([SpecIssue("parallel", "auto", f"export to {target} needs a concrete plan.",
                                   "resolve it first (loom search, or resolve_auto(spec)), or write a "
                                   "[parallel] table.")])


# ---- Megatron-LM -----------------------------------------------------------------------------------------
def megatron_args(spec: Spec) -> tuple[list[str], list[str]]:
    """(arguments, notes): the argv for Megatron-LM's pretrain_gpt.py and what could not be mapped exactly."""
    _check_plan(spec, "Megatron-LM")
    m, t, p = spec.model, spec.training, spec.plan
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
    add("--lr-decay-style", _LR_STYLE[t.lr_schedule])
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


# ---- torchtitan ------------------------------------------------------------------------------------------
# torchtitan/models/llama3/__init__.py: the flavors whose dimensions are published there.
_TT_FLAVORS = {"8B": (4096, 32, 32, 8, 1.3, 1024), "70B": (8192, 80, 64, 8, 1.3, 4096),
               "405B": (16384, 126, 128, 8, 1.2, 4096)}   # dim, n_layers, n_heads, n_kv_heads, ffn mult, multiple_of


def torchtitan_ffn(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """torchtitan's FeedForward width (torchtitan/models/llama3/model/model.py): from hidden_dim = 4·dim,
    int(2·hidden_dim/3), times the multiplier, rounded up to a multiple of `multiple_of`."""
    h = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        h = int(ffn_dim_multiplier * h)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def _tt_ffn_args(m: ModelSpec) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) reproducing m.ffn_hidden exactly in torchtitan's formula.

    With multiple_of = ffn_hidden any width x in (0, ffn_hidden] rounds up to ffn_hidden; the multiplier
    ffn_hidden / int(8·dim/3), floored to 6 decimals, puts x just at or below ffn_hidden."""
    for flavor in _TT_FLAVORS.values():
        if flavor[0] == m.hidden and torchtitan_ffn(m.hidden, flavor[5], flavor[4]) == m.ffn_hidden:
            return flavor[5], flavor[4]
    base = int(2 * (4 * m.hidden) / 3)
    mult = math.floor(m.ffn_hidden / base * 1e6) / 1e6
    return m.ffn_hidden, mult


def _torchtitan_model_issues(m: ModelSpec) -> list[SpecIssue]:
    fix = "export to Megatron-LM instead (--to megatron), or use a Llama-style model"
    issues = []
    for field, value, ok in (("model.activation", m.activation, m.activation == "swiglu"),
                             ("model.norm", m.norm, m.norm == "rmsnorm"),
                             ("model.position", m.position, m.position == "rope"),
                             ("model.bias", m.bias, not m.bias),
                             ("model.tied_embeddings", m.tied_embeddings, not m.tied_embeddings),
                             ("model.head_dim", m.head_dim, m.head_dim in (None, m.hidden // m.heads))):
        if not ok:
            issues.append(SpecIssue(field, value, "torchtitan's llama3 model cannot express this.", fix + "."))
    return issues


def torchtitan_config(spec: Spec) -> tuple[dict[str, dict[str, object]], str, list[str]]:
    """(TOML tables, the TransformerModelArgs entry for the model, notes)."""
    _check_plan(spec, "torchtitan")
    m, t, p = spec.model, spec.training, spec.plan
    issues = _torchtitan_model_issues(m)
    if issues:
        raise SpecError(issues)
    notes: list[str] = []
    multiple_of, mult = _tt_ffn_args(m)
    flavor = next((name for name, f in _TT_FLAVORS.items()
                   if (f[0], f[1], f[2], f[3]) == (m.hidden, m.layers, m.heads, m.n_kv_heads)
                   and torchtitan_ffn(f[0], f[5], f[4]) == m.ffn_hidden and m.vocab == 128256), None)
    args = (f"TransformerModelArgs(dim={m.hidden}, n_layers={m.layers}, n_heads={m.heads}, "
            f"n_kv_heads={m.n_kv_heads}, vocab_size={m.vocab}, multiple_of={multiple_of}, "
            f"ffn_dim_multiplier={mult}, norm_eps={m.norm_eps}, rope_theta={m.rope_theta}, max_seq_len={m.seq_len})")

    par: dict[str, object] = {}
    if p.zero == 0:
        par.update(data_parallel_replicate_degree=p.dp, data_parallel_shard_degree=1)
    else:
        par.update(data_parallel_replicate_degree=1, data_parallel_shard_degree=p.dp)
        if p.zero in (1, 2):
            par["fsdp_reshard_after_forward"] = "never"
        if p.zero == 1:
            notes.append("zero = 1 exported as FSDP2 without resharding after forward (ZeRO-2): torchtitan has "
                         "no optimizer-only sharding")
    par["tensor_parallel_degree"] = p.tp
    par["enable_async_tensor_parallel"] = False      # needs torch.compile; Loom's plans do not assume it
    if p.tp > 1 and not p.sp:
        notes.append("torchtitan always shards activations over TP (sequence parallel); sp = false is not expressible")
    par["pipeline_parallel_degree"] = p.pp
    if p.pp > 1:
        chunks = p.pp * (p.vpp if p.schedule == "interleaved" else 1)
        par.update(pipeline_parallel_schedule=_TT_SCHEDULES[p.schedule],
                   pipeline_parallel_microbatch_size=t.micro_batch)
        if m.layers % chunks == 0:
            # Loom splits layers evenly; torchtitan's default gives the first/last stage one less
            par.update(pipeline_parallel_layers_per_stage=m.layers // chunks,
                       pipeline_parallel_first_stage_less_layers=0, pipeline_parallel_last_stage_less_layers=0)
        else:
            # Loom's uneven split = torchtitan's weighted split (embedding and head count as one layer each)
            par.update(pipeline_parallel_first_stage_less_layers=1, pipeline_parallel_last_stage_less_layers=1)
            if not _uneven_matches(m.layers, chunks):
                notes.append(f"torchtitan's weighted split {_weighted_split(m.layers, chunks)} differs from "
                             f"Loom's {[len(r) for r in split_layers(m.layers, chunks)]}: set "
                             "parallelism.module_fqns_per_model_part to match exactly")
    par["context_parallel_degree"] = p.cp
    if tuple(p.mesh) != ("pp", "dp", "cp", "tp"):
        notes.append(f"mesh {list(p.mesh)}: torchtitan's mesh order is fixed (pp, dp_replicate, dp_shard·cp, tp)")

    # torchtitan: local_batch_size is per DP rank; global_batch_size > local·dp means gradient accumulation;
    # with PP the local batch is cut into pipeline_parallel_microbatch_size micro-batches.
    per_replica = t.global_batch // p.dp
    training: dict[str, object] = dict(local_batch_size=per_replica if p.pp > 1 else t.micro_batch,
                                       global_batch_size=t.global_batch, seq_len=m.seq_len, max_norm=t.grad_clip,
                                       steps=_train_iters(spec) or 10000,
                                       mixed_precision_param="float32" if t.precision == "fp32" else "bfloat16")
    if not _train_iters(spec):
        notes.append("training.tokens not set: steps = 10000 (torchtitan's default)")
    if t.grad_dtype == "bf16":
        notes.append("grad_dtype = bf16: torchtitan reduces in float32 only (mixed_precision_reduce)")
    model: dict[str, object] = dict(name="llama3", flavor=flavor or "loom_custom")
    if t.precision == "fp8":
        model["converters"] = ["float8"]
    if t.optimizer == "sgd":
        raise SpecError([SpecIssue("training.optimizer", "sgd", "torchtitan's TOML config builds AdamW/Adam only.",
                                   "use optimizer = \"adamw\", or export to Megatron-LM.")])
    sched: dict[str, object] = dict(warmup_steps=t.warmup_steps, min_lr_factor=t.min_lr / t.lr)
    if t.lr_schedule == "cosine":
        sched["decay_type"] = "cosine"
    elif t.lr_schedule == "wsd":
        sched.update(decay_type="linear", decay_ratio=t.decay_fraction)
    else:
        sched.update(decay_ratio=0.0)    # constant after warmup: nothing decays
    tables = {
        "job": dict(description=f"loom export: {m.name} on {spec.world_size} x {spec.gpu.name}"),
        "model": model,
        "optimizer": dict(name="AdamW" if t.optimizer == "adamw" else "Adam", lr=t.lr, weight_decay=t.weight_decay),
        "lr_scheduler": sched,
        "training": training,
        "parallelism": par,
        # Loom's selective recompute reruns the attention core (Korthikanti et al. 2022 §4.2); torchtitan's
        # per-op selective AC ("op") saves matmul outputs and recomputes the rest: the closest match.
        "activation_checkpoint": dict(mode=t.recompute, **({"selective_ac_option": "op"}
                                                           if t.recompute == "selective" else {})),
        "debug": dict(seed=t.seed),
    }
    return tables, args, notes


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def export_torchtitan(spec: Spec) -> str:
    """A torchtitan job config (TOML, `--job.config_file`), with the model flavor to register in a comment."""
    tables, args, notes = torchtitan_config(spec)
    flavor = tables["model"]["flavor"]
    lines = [f"# torchtitan job config for {spec.model.name} on {spec.world_size} × {spec.gpu.name} "
             "(torchtitan/config/job_config.py, TOML era, e347b1e5)",
             f"# model flavor \"{flavor}\" ({'published in' if flavor != 'loom_custom' else 'add it to'} "
             "torchtitan/models/llama3/__init__.py, llama3_args):",
             f"#   \"{flavor}\": {args},"]
    lines += [f"# note: {n}" for n in notes]
    for section, values in tables.items():
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


_ARGS_RE = re.compile(r"TransformerModelArgs\((.*)\)")


def parse_torchtitan(text: str) -> tuple[dict, dict[str, object]]:
    """Our own torchtitan output back to (TOML tables, TransformerModelArgs keyword values)."""
    tables = tomllib.loads(text)
    match = next(_ARGS_RE.search(line) for line in text.splitlines() if _ARGS_RE.search(line))
    kwargs: dict[str, object] = {}
    for part in match.group(1).split(", "):
        k, v = part.split("=")
        kwargs[k] = None if v == "None" else (int(v) if re.fullmatch(r"-?\d+", v) else float(v))
    return tables, kwargs


def model_from_torchtitan(text: str, name: str = "custom") -> ModelSpec:
    """The ModelSpec a torchtitan export describes (the llama3 model: SwiGLU, RMSNorm, RoPE, untied, no bias)."""
    tables, kw = parse_torchtitan(text)
    return ModelSpec(name=name, layers=kw["n_layers"], hidden=kw["dim"], heads=kw["n_heads"],
                     kv_heads=kw["n_kv_heads"], vocab=kw["vocab_size"],
                     ffn_hidden=torchtitan_ffn(kw["dim"], kw["multiple_of"], kw["ffn_dim_multiplier"]),
                     seq_len=tables["training"]["seq_len"], rope_theta=kw["rope_theta"], norm_eps=kw["norm_eps"])
