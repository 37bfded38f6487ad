"""Hypothesis strategies for Loom specs, for property tests of anything that consumes a Spec.

    from hypothesis import given
    from loom.spec.strategies import valid_specs, invalid_specs

    @given(valid_specs())
    def test_my_tool_accepts_every_valid_spec(spec): ...

    @given(invalid_specs())
    def test_my_tool_rejects_bad_input(case):
        data, field = case          # spec_from_dict(data) raises SpecError naming `field`

- `models()`      ModelSpec: small-to-medium shapes (hidden up to a few thousand), GQA or MHA, SwiGLU or GELU.
- `clusters()`    ClusterSpec on a catalog GPU.
- `plans(model)`  ParallelSpec whose tp divides heads, kv_heads and ffn_hidden and whose pp·vpp divides layers.
- `valid_specs()` whole Specs, built with `spec_from_dict` so they pass every check the loader makes: the
                  divisibility rules are built into the draw, not filtered afterwards.
- `invalid_specs()` (data, field) pairs: a valid spec's data with one deliberate mistake, and the dotted field
                  the SpecError must name.

Hypothesis is imported here only (a dev dependency); `loom.spec` itself never imports this module.
"""
from __future__ import annotations

import copy

from hypothesis import strategies as st

from .errors import divisors
from .load import spec_from_dict
from .model import ModelSpec
from .spec import ClusterSpec, ParallelSpec, Spec

GPUS = ["A100-80GB", "H100-SXM", "H200", "B200"]
_DEGREES = [1, 2, 4, 8]


@st.composite
def model_dicts(draw, tp: int = 1, layer_multiple: int = 1) -> dict:
    """A [model] table whose heads, kv_heads and ffn_hidden are divisible by `tp` and whose layers are a
    multiple of `layer_multiple` (pp·vpp)."""
    kv_heads = tp * draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([16, 32, 64, 128]))
    hidden = heads * head_dim
    gelu = draw(st.booleans())
    ffn = tp * 16 * draw(st.integers(1, 64))
    return {
        "name": "drawn",
        "layers": layer_multiple * draw(st.integers(1, 6)),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": kv_heads,
        "ffn_hidden": ffn,
        "vocab": draw(st.integers(256, 130_000)),
        "seq_len": draw(st.sampled_from([256, 512, 1024, 2048, 4096, 8192])),
        "activation": "gelu" if gelu else "swiglu",
        "norm": "layernorm" if gelu else "rmsnorm",
        "position": draw(st.sampled_from(["rope", "learned"])),
        "bias": draw(st.booleans()),
        "tied_embeddings": draw(st.booleans()),
    }


def models() -> st.SearchStrategy[ModelSpec]:
    return model_dicts().map(lambda d: ModelSpec(**d))


@st.composite
def cluster_dicts(draw, world: int | None = None) -> dict:
    """A [cluster] table on a catalog GPU; with `world`, exactly that many GPUs (8 per node when it divides)."""
    world = world if world is not None else draw(st.sampled_from([1, 2, 4, 8, 16, 64]))
    gpn = 8 if world % 8 == 0 else world
    return {"gpu": draw(st.sampled_from(GPUS)), "gpus_per_node": gpn, "nodes": world // gpn}


def clusters() -> st.SearchStrategy[ClusterSpec]:
    return cluster_dicts().map(lambda d: ClusterSpec(**d))


@st.composite
def plan_dicts(draw, tp: int | None = None) -> dict:
    """A [parallel] table before the model is known (the model is then drawn to fit it)."""
    tp = tp if tp is not None else draw(st.sampled_from(_DEGREES))
    pp = draw(st.sampled_from([1, 2, 4]))
    schedule = draw(st.sampled_from(["afab", "1f1b", "interleaved"] if pp > 1 else ["afab", "1f1b"]))
    dp, cp, sp = draw(st.sampled_from(_DEGREES)), draw(st.sampled_from([1, 2, 4])), tp > 1 and draw(st.booleans())
    zero = draw(st.sampled_from([0, 1, 2, 3]))
    return {
        "dp": dp, "tp": tp, "pp": pp, "cp": cp, "sp": sp, "zero": zero,
        "schedule": schedule, "vpp": draw(st.sampled_from([2, 3])) if schedule == "interleaved" else 1,
        "bucket_MB": draw(st.sampled_from([1.0, 25.0, 100.0])),
        # the overlap options where spec/validate.py allows them (sp; a sharded optimizer over dp·cp > 1)
        "tp_comm_overlap": sp and draw(st.booleans()),
        "overlap_param_gather": zero >= 1 and dp * cp > 1 and draw(st.booleans()),
    }


def plans(model: ModelSpec) -> st.SearchStrategy[ParallelSpec]:
    """Parallel plans valid for `model` (degrees among the divisors its shape allows)."""
    tps = [d for d in divisors(model.heads) if model.n_kv_heads % d == 0 and model.ffn_hidden % d == 0 and d <= 8]

    @st.composite
    def draw_plan(draw):
        plan = draw(plan_dicts(tp=draw(st.sampled_from(tps))))
        pps = [d for d in divisors(model.layers) if d <= 8]
        plan["pp"] = draw(st.sampled_from(pps))
        if plan["pp"] == 1 or model.layers % (plan["pp"] * plan["vpp"]):
            plan["schedule"], plan["vpp"] = ("1f1b" if plan["schedule"] == "interleaved" else plan["schedule"]), 1
        return ParallelSpec(**plan)
    return draw_plan()


@st.composite
def valid_spec_dicts(draw) -> dict:
    plan = draw(plan_dicts())
    model = draw(model_dicts(tp=plan["tp"], layer_multiple=plan["pp"] * plan["vpp"]))
    # the sequence must split into 2·cp zigzag chunks, and (with sp) the local sequence over tp
    need = 2 * plan["cp"] * (plan["tp"] if plan["sp"] else 1)
    model["seq_len"] = max(need, model["seq_len"] - model["seq_len"] % need)
    micro_batch = draw(st.sampled_from([1, 2, 4]))
    steps = draw(st.integers(1, 8))
    if plan["schedule"] == "interleaved":
        steps *= plan["pp"]                                  # Megatron: micro-batches divisible by pp
    world = plan["dp"] * plan["tp"] * plan["pp"] * plan["cp"]
    cluster = draw(cluster_dicts(world=world))
    precision = draw(st.sampled_from(["bf16", "fp32"] + (["fp8"] if cluster["gpu"] != "A100-80GB" else [])))
    training = {
        "global_batch": plan["dp"] * micro_batch * steps, "micro_batch": micro_batch, "precision": precision,
        "grad_dtype": draw(st.sampled_from(["fp32", "bf16"])),
        "optimizer": draw(st.sampled_from(["adamw", "adam", "sgd"])),
        # "op" (per-op selective AC) is valid with cp = 1 only (spec/validate.py)
        "recompute": draw(st.sampled_from(["none", "selective", "full"] + (["op"] if plan["cp"] == 1 else []))),
    }
    return {"model": model, "cluster": cluster, "training": training, "parallel": plan}


def valid_specs() -> st.SearchStrategy[Spec]:
    """Valid Specs with a concrete parallel plan, validated by `spec_from_dict`."""
    return valid_spec_dicts().map(spec_from_dict)


# ---- one deliberate mistake each: (how to break the data, the field the error must name) ---------------------
def _tp_not_dividing_heads(d: dict) -> str:
    d["model"]["heads"], d["model"]["kv_heads"] = 3, 3
    d["model"]["hidden"] = 3 * 64
    d["parallel"]["tp"], d["parallel"]["sp"] = 2, False
    return "parallel.tp"


def _tp_not_dividing_kv(d: dict) -> str:
    d["model"]["heads"], d["model"]["kv_heads"], d["model"]["hidden"] = 8, 1, 8 * 64
    d["model"]["ffn_hidden"] = 1024
    d["parallel"]["tp"] = 2
    return "parallel.tp"


def _tp_not_dividing_ffn(d: dict) -> str:
    d["model"]["heads"], d["model"]["kv_heads"], d["model"]["hidden"] = 8, 8, 8 * 64
    d["model"]["ffn_hidden"] = 1001
    d["parallel"]["tp"] = 2
    return "parallel.tp"


def _world_mismatch(d: dict) -> str:
    d["cluster"]["nodes"] += 1
    return "parallel"


def _unknown_gpu(d: dict) -> str:
    d["cluster"]["gpu"] = "H1000"
    return "cluster.gpu"


def _unknown_preset(d: dict) -> str:
    d["model"] = {"preset": "llama9-8b"}
    return "model.preset"


def _wrong_type(d: dict) -> str:
    d["model"]["layers"] = "many"
    return "model.layers"


def _unknown_field(d: dict) -> str:
    d["parallel"]["tpp"] = 2
    return "parallel.tpp"


def _missing_field(d: dict) -> str:
    del d["model"]["hidden"]
    return "model.hidden"


def _seq_not_divisible(d: dict) -> str:
    d["parallel"]["cp"] = 2
    d["parallel"]["dp"] = 1
    d["cluster"].update(gpus_per_node=2 * d["parallel"]["tp"] * d["parallel"]["pp"], nodes=1)
    d["model"]["seq_len"] = 1026
    return "model.seq_len"


def _global_batch(d: dict) -> str:
    d["parallel"]["dp"] = 2
    d["cluster"].update(gpus_per_node=2 * d["parallel"]["tp"] * d["parallel"]["pp"] * d["parallel"]["cp"], nodes=1)
    d["training"]["micro_batch"] = 1
    d["training"]["global_batch"] = 3
    return "training.global_batch"


def _sp_without_tp(d: dict) -> str:
    d["parallel"]["sp"] = True
    d["parallel"]["tp"] = 1
    d["cluster"].update(gpus_per_node=d["parallel"]["dp"] * d["parallel"]["pp"] * d["parallel"]["cp"], nodes=1)
    return "parallel.sp"


def _tp_overlap_without_sp(d: dict) -> str:
    d["parallel"]["tp_comm_overlap"], d["parallel"]["sp"] = True, False
    return "parallel.tp_comm_overlap"


def _param_gather_overlap_without_zero(d: dict) -> str:
    d["parallel"]["overlap_param_gather"], d["parallel"]["zero"] = True, 0
    return "parallel.overlap_param_gather"


def _interleaved_without_vpp(d: dict) -> str:
    d["parallel"]["schedule"], d["parallel"]["vpp"] = "interleaved", 1
    return "parallel.vpp"


def _bogus_parallel(d: dict) -> str:
    d["parallel"] = "bogus"
    return "parallel"


def _fp8_on_a100(d: dict) -> str:
    d["cluster"]["gpu"] = "A100-80GB"
    d["training"]["precision"] = "fp8"
    return "training.precision"


def _bad_schedule(d: dict) -> str:
    d["parallel"]["schedule"] = "zigzag"
    return "parallel.schedule"


def _negative_dp(d: dict) -> str:
    d["parallel"]["dp"] = 0
    return "parallel.dp"


MUTATIONS = [_tp_not_dividing_heads, _tp_not_dividing_kv, _tp_not_dividing_ffn, _world_mismatch, _unknown_gpu,
             _unknown_preset, _wrong_type, _unknown_field, _missing_field, _seq_not_divisible, _global_batch,
             _sp_without_tp, _tp_overlap_without_sp, _param_gather_overlap_without_zero, _interleaved_without_vpp,
             _bogus_parallel, _fp8_on_a100, _bad_schedule, _negative_dp]


@st.composite
def invalid_specs(draw) -> tuple[dict, str]:
    """(data, field): spec data with exactly one kind of mistake, and the dotted field its SpecError names."""
    data = copy.deepcopy(draw(valid_spec_dicts()))
    mutate = draw(st.sampled_from(MUTATIONS))
    return data, mutate(data)
