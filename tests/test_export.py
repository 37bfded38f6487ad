"""loom export: every field maps to a real Megatron-LM flag / torchtitan key, and the model round-trips."""
from __future__ import annotations

import tomllib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from loom.spec import PRESETS, ModelSpec, SpecError, spec_from_dict
from loom.spec.compile import split_layers
from loom.spec.export import (MEGATRON_FLAGS, TORCHTITAN_KEYS, _weighted_split, export_megatron, export_torchtitan,
                              megatron_args, model_from_megatron, model_from_torchtitan, parse_megatron_args,
                              parse_torchtitan, torchtitan_ffn)


def make(model: dict | str = "llama3-70b", nodes: int = 128, **parallel) -> object:
    m = {"preset": model} if isinstance(model, str) else model
    training = parallel.pop("training", {})
    p = dict(dp=16, tp=8, pp=8, cp=1, sp=True, zero=1, schedule="interleaved", vpp=5)
    p.update(parallel)
    t = dict(global_batch=1024, micro_batch=1, tokens=15e12, recompute="selective")
    t.update(training)
    return spec_from_dict({"model": m, "cluster": {"gpu": "H100-SXM", "nodes": nodes}, "training": t,
                           "parallel": p})


def _same_model(a: ModelSpec, b: ModelSpec) -> bool:
    skip = {"name", "kv_heads", "head_dim"}
    return ({k: v for k, v in a.model_dump().items() if k not in skip}
            == {k: v for k, v in b.model_dump().items() if k not in skip}
            and a.n_kv_heads == b.n_kv_heads and a.d_head == b.d_head)


def test_megatron_llama3_70b_maps_every_field():
    spec = make()
    out = export_megatron(spec)
    args = parse_megatron_args(out)
    expected = {"tensor_model_parallel_size": "8", "pipeline_model_parallel_size": "8",
                "num_layers_per_virtual_pipeline_stage": "2", "context_parallel_size": "1",
                "sequence_parallel": True, "use_distributed_optimizer": True,
                "recompute_granularity": "selective", "micro_batch_size": "1", "global_batch_size": "1024",
                "num_layers": "80", "hidden_size": "8192", "num_attention_heads": "64",
                "group_query_attention": True, "num_query_groups": "8", "ffn_hidden_size": "28672",
                "seq_length": "8192", "max_position_embeddings": "8192", "swiglu": True,
                "normalization": "RMSNorm", "position_embedding_type": "rope", "rotary_base": "500000",
                "untie_embeddings_and_output_weights": True, "disable_bias_linear": True, "bf16": True,
                "lr": "0.0003", "min_lr": "3e-05", "lr_decay_style": "cosine", "weight_decay": "0.1",
                "clip_grad": "1.0", "train_iters": str(-(-15_000_000_000_000 // (1024 * 8192))),
                "vocab_size": "128256", "seed": "0"}
    for k, v in expected.items():
        assert args.get(k) == v, k
    flags, _ = megatron_args(spec)
    assert {f for f in flags if f.startswith("--")} <= MEGATRON_FLAGS


@pytest.mark.parametrize("zero,expect", [(0, {}), (1, {"use_distributed_optimizer": True}),
                                         (2, {"use_megatron_fsdp": True,
                                              "data_parallel_sharding_strategy": "optim_grads"}),
                                         (3, {"use_megatron_fsdp": True,
                                              "data_parallel_sharding_strategy": "optim_grads_params"})])
def test_megatron_zero_mapping(zero, expect):
    args = parse_megatron_args(export_megatron(make(zero=zero, schedule="1f1b", vpp=1)))
    for k in ("use_distributed_optimizer", "use_megatron_fsdp", "data_parallel_sharding_strategy"):
        assert args.get(k) == expect.get(k)
    assert "num_layers_per_virtual_pipeline_stage" not in args


def test_megatron_full_recompute_gpt_style_and_notes():
    spec = make("gpt3-175b", nodes=128, dp=16, tp=8, pp=8, schedule="afab", vpp=1, zero=0,
                mesh=["dp", "pp", "cp", "tp"], training={"recompute": "full", "precision": "fp16"})
    out = export_megatron(spec)
    args = parse_megatron_args(out)
    assert args["recompute_granularity"] == "full" and args["recompute_method"] == "uniform"
    assert args["normalization"] == "LayerNorm" and args["position_embedding_type"] == "learned_absolute"
    assert "swiglu" not in args and "disable_bias_linear" not in args
    assert "untie_embeddings_and_output_weights" not in args and args["fp16"] is True
    assert args["use_tp_pp_dp_mapping"] is True
    assert "no all-forward-all-backward" in out       # afab's approximation is stated


def test_megatron_auto_plan_is_a_named_error():
    spec = spec_from_dict({"model": {"preset": "llama3-8b"}, "cluster": {"nodes": 1},
                           "training": {"global_batch": 8}, "parallel": "auto"})
    with pytest.raises(SpecError) as e:
        export_megatron(spec)
    assert e.value.fields() == ["parallel"]


def test_torchtitan_llama3_70b():
    spec = make()
    out = export_torchtitan(spec)
    tables, kw = parse_torchtitan(out)
    for section, keys in tables.items():
        assert section in TORCHTITAN_KEYS and set(keys) <= TORCHTITAN_KEYS[section], section
    par = tables["parallelism"]
    assert par["data_parallel_shard_degree"] == 16 and par["data_parallel_replicate_degree"] == 1
    assert par["fsdp_reshard_after_forward"] == "never"          # zero 1 -> ZeRO-2 approximation, stated
    assert "no optimizer-only sharding" in out
    assert par["tensor_parallel_degree"] == 8 and par["pipeline_parallel_degree"] == 8
    assert par["pipeline_parallel_schedule"] == "Interleaved1F1B"
    assert par["pipeline_parallel_layers_per_stage"] == 2 and par["context_parallel_degree"] == 1
    tr = tables["training"]
    assert tr["local_batch_size"] == 1024 // 16 and tr["global_batch_size"] == 1024 and tr["seq_len"] == 8192
    assert tables["model"]["flavor"] == "70B"
    assert tables["activation_checkpoint"]["mode"] == "selective"
    assert kw["multiple_of"] == 4096 and kw["ffn_dim_multiplier"] == 1.3


@pytest.mark.parametrize("zero,rep,shard", [(0, 128, 1), (2, 1, 128), (3, 1, 128)])
def test_torchtitan_zero_mapping(zero, rep, shard):
    tables, _ = parse_torchtitan(export_torchtitan(make(zero=zero, pp=1, dp=128, schedule="1f1b", vpp=1)))
    par = tables["parallelism"]
    assert (par["data_parallel_replicate_degree"], par["data_parallel_shard_degree"]) == (rep, shard)
    assert ("fsdp_reshard_after_forward" in par) == (zero == 2)
    assert tables["training"]["local_batch_size"] == 1      # pp = 1: micro-batch; accumulation via global


def test_torchtitan_rejects_what_llama3_cannot_express():
    with pytest.raises(SpecError) as e:
        export_torchtitan(make("gpt2-124m", nodes=1, dp=8, tp=1, pp=1, schedule="1f1b", vpp=1, sp=False,
                               training={"global_batch": 64}))
    assert {"model.activation", "model.norm", "model.position", "model.bias", "model.tied_embeddings"} <= set(
        e.value.fields())


def test_torchtitan_ffn_formula_reproduces_published_flavors():
    """torchtitan's flavors give Llama 3's published ffn widths (Meta 2024, Table 3)."""
    assert torchtitan_ffn(4096, 1024, 1.3) == 14336
    assert torchtitan_ffn(8192, 4096, 1.3) == 28672
    assert torchtitan_ffn(16384, 4096, 1.2) == 53248


llama_models = st.builds(
    lambda heads_per_kv, kv, head_dim, layers, ffn_mult, vocab, seq, theta: dict(
        layers=layers, hidden=heads_per_kv * kv * head_dim, heads=heads_per_kv * kv, kv_heads=kv,
        ffn_hidden=ffn_mult * 64, vocab=vocab, seq_len=seq, rope_theta=theta),
    st.integers(1, 8), st.sampled_from([1, 2, 4, 8]), st.sampled_from([32, 64, 128]), st.integers(1, 96),
    st.integers(1, 600), st.integers(100, 200_000), st.sampled_from([1024, 2048, 8192]),
    st.sampled_from([10000.0, 500000.0]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(llama_models)
def test_round_trip_model_dims(model):
    spec = spec_from_dict({"model": model, "cluster": {"gpu": "H100-SXM", "nodes": 1},
                           "training": {"global_batch": 8}, "parallel": {"dp": 8}})
    m = spec.model
    assert _same_model(model_from_megatron(parse_megatron_args(export_megatron(spec))), m)
    assert _same_model(model_from_torchtitan(export_torchtitan(spec)), m)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip_presets_megatron(name):
    spec = spec_from_dict({"model": {"preset": name}, "cluster": {"gpu": "H100-SXM", "nodes": 1},
                           "training": {"global_batch": 8}, "parallel": {"dp": 8}})
    assert _same_model(model_from_megatron(parse_megatron_args(export_megatron(spec))), spec.model)


def test_torchtitan_output_is_valid_toml_for_every_schedule():
    for sched, vpp in (("afab", 1), ("1f1b", 1), ("interleaved", 2)):
        out = export_torchtitan(make(schedule=sched, vpp=vpp))
        assert tomllib.loads(out)["parallelism"]["pipeline_parallel_schedule"] in ("GPipe", "1F1B", "Interleaved1F1B")


def test_uneven_split_maps_to_the_frameworks_weighted_split():
    """Llama 3 405B: 126 layers on 16 stages (7, 8×14, 7), also interleaved ×2 (3, 4×30, 3). Megatron counts the
    embedding and the loss as layers, torchtitan gives the first and last stage one layer less: the same split."""
    for vpp, sched in ((1, "1f1b"), (2, "interleaved")):
        spec = make("llama3-405b", nodes=64, dp=4, tp=8, pp=16, schedule=sched, vpp=vpp, uneven_split=True,
                    training={"global_batch": 512})
        assert _weighted_split(126, 16 * vpp) == [len(r) for r in split_layers(126, 16 * vpp)]
        args = parse_megatron_args(export_megatron(spec))
        assert args["account_for_embedding_in_pipeline_split"] is True
        assert args["account_for_loss_in_pipeline_split"] is True
        assert "num_layers_per_virtual_pipeline_stage" not in args
        assert args.get("num_virtual_stages_per_pipeline_rank") == (str(vpp) if vpp > 1 else None)
        par = parse_torchtitan(export_torchtitan(spec))[0]["parallelism"]
        assert "pipeline_parallel_layers_per_stage" not in par
        assert par["pipeline_parallel_first_stage_less_layers"] == 1
        assert par["pipeline_parallel_last_stage_less_layers"] == 1
        flags, _ = megatron_args(spec)
        assert {f for f in flags if f.startswith("--")} <= MEGATRON_FLAGS
