"""`loom export --to torchtitan`: the spec as a torchtitan job config (TOML; keys checked at torchtitan e347b1e5;
the mapping of ZeRO stages is in loom.spec.export's docstring)."""
from __future__ import annotations

import math
import re
import tomllib

from .errors import SpecError, SpecIssue
from .compile import split_layers
from .export import _check_plan, _train_iters, _uneven_matches, _weighted_split
from .model import ModelSpec
from .spec import Spec

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
    "compile": frozenset({"enable", "components"}),
}

_TT_SCHEDULES = {"afab": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B"}   # torch.distributed.pipelining


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
    # tp_comm_overlap -> torchtitan's async TP (torch's micro-pipelined TP: fused all-gather-matmul and
    # matmul-reduce-scatter), which torchtitan/distributed/tensor_parallel.py maybe_enable_async_tp refuses
    # without torch.compile of the model: [compile] enable, components model and loss.
    par["enable_async_tensor_parallel"] = p.tp_comm_overlap
    if p.tp_comm_overlap:
        notes.append("tp_comm_overlap exported as async TP (torch.compile on): torch's micro-pipelined TP, not "
                     "TransformerEngine's userbuffers, whose schedules the simulator models")
    if p.overlap_param_gather:
        notes.append("overlap_param_gather: FSDP2 prefetches its parameter all-gathers during the forward by "
                     "itself; nothing to set")
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
        # Loom's "op" is torchtitan's per-op selective AC exactly (torchtitan/models/llama3/infra/parallelize.py
        # _save_list). Loom's selective recompute reruns the attention core (Korthikanti et al. 2022 §4.2), which
        # torchtitan has no mode for; its per-op AC is the closest match.
        "activation_checkpoint": dict(mode="selective" if t.recompute == "op" else t.recompute,
                                      **({"selective_ac_option": "op"}
                                         if t.recompute in ("selective", "op") else {})),
        "debug": dict(seed=t.seed),
    }
    if p.tp_comm_overlap:
        tables["compile"] = dict(enable=True, components=["model", "loss"])
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


def overlaps_from_torchtitan(text: str) -> dict[str, bool]:
    """The overlap options a torchtitan export sets: async TP (with compile) is tp_comm_overlap. FSDP2 always
    overlaps its parameter gathers, so overlap_param_gather is not recoverable from the config (always False)."""
    tables, _ = parse_torchtitan(text)
    async_tp = bool(tables["parallelism"].get("enable_async_tensor_parallel")) and \
        bool(tables.get("compile", {}).get("enable"))
    return {"tp_comm_overlap": async_tp, "overlap_param_gather": False}


def model_from_torchtitan(text: str, name: str = "custom") -> ModelSpec:
    """The ModelSpec a torchtitan export describes (the llama3 model: SwiGLU, RMSNorm, RoPE, untied, no bias)."""
    tables, kw = parse_torchtitan(text)
    return ModelSpec(name=name, layers=kw["n_layers"], hidden=kw["dim"], heads=kw["n_heads"],
                     kv_heads=kw["n_kv_heads"], vocab=kw["vocab_size"],
                     ffn_hidden=torchtitan_ffn(kw["dim"], kw["multiple_of"], kw["ffn_dim_multiplier"]),
                     seq_len=tables["training"]["seq_len"], rope_theta=kw["rope_theta"], norm_eps=kw["norm_eps"])
