"""Malformed specs: each raises SpecError naming the field, and its message carries a usable fix."""
from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings

from loom.spec import SpecError, parse_spec, spec_from_dict
from loom.spec.strategies import invalid_specs

BASE = {
    "model": {"preset": "llama3-8b"},
    "cluster": {"gpu": "H100-SXM", "gpus_per_node": 8, "nodes": 1},
    "training": {"global_batch": 64, "micro_batch": 1},
    "parallel": {"dp": 8},
}


def base(**tables) -> dict:
    d = copy.deepcopy(BASE)
    for table, fields in tables.items():
        if isinstance(fields, dict) and isinstance(d.get(table), dict):
            d[table].update(fields)
        else:
            d[table] = fields
    return d


def issue(data: dict, field: str):
    with pytest.raises(SpecError) as exc:
        spec_from_dict(data)
    matches = [i for i in exc.value.issues if i.field == field]
    assert matches, f"expected an issue on {field}, got {exc.value.fields()}"
    return matches[0]


def test_base_is_valid():
    assert spec_from_dict(base()).plan.dp == 8


def test_tp_not_dividing_heads():
    d = base(model={"preset": "gpt2-124m"}, parallel={"dp": 1, "tp": 8})   # 12 heads
    i = issue(d, "parallel.tp")
    assert "heads" in i.problem and "tp in" in i.fix


def test_tp_not_dividing_kv_heads():
    d = base(model={"preset": "llama3-8b", "kv_heads": 2}, parallel={"dp": 2, "tp": 4})
    i = issue(d, "parallel.tp")
    assert "kv_heads" in i.problem and "[1, 2]" in i.fix


def test_tp_not_dividing_ffn():
    d = base(model={"preset": "llama3-8b", "ffn_hidden": 14340}, parallel={"dp": 1, "tp": 8})
    i = issue(d, "parallel.tp")
    assert "ffn_hidden" in i.problem and "tp in" in i.fix


def test_world_size_mismatch_suggests_dp():
    i = issue(base(parallel={"dp": 4}), "parallel")
    assert "8 GPUs" in i.problem and "parallel.dp = 8" in i.fix


def test_unknown_gpu_suggests_catalog_names():
    i = issue(base(cluster={"gpu": "H100-PCIE-96"}), "cluster.gpu")
    assert "H100-SXM" in i.fix and "custom_gpu" in i.fix


def test_unknown_preset_suggests_close_names():
    i = issue(base(model={"preset": "llama3-8"}), "model.preset")
    assert "llama3-8b" in i.fix


def test_bad_toml_syntax_names_the_file():
    with pytest.raises(SpecError) as exc:
        parse_spec("[model\npreset = 'llama3-8b'")
    assert exc.value.fields() == ["file"] and "line" in str(exc.value)


def test_wrong_type_names_field_and_how_to_write_it():
    i = issue(base(model={"preset": "llama3-8b", "layers": "many"}), "model.layers")
    assert "whole number" in i.fix


def test_unknown_field_did_you_mean():
    i = issue(base(training={"global_batch": 64, "micro_batch": 1, "micro_bach": 2}), "training.micro_bach")
    assert "did you mean training.micro_batch" in i.fix


def test_seq_len_not_divisible_by_two_cp():
    d = base(model={"preset": "llama3-8b", "seq_len": 8190}, parallel={"dp": 2, "cp": 4})
    i = issue(d, "model.seq_len")
    assert "divisible by 8" in i.fix


def test_global_batch_not_divisible():
    i = issue(base(training={"global_batch": 60, "micro_batch": 1}), "training.global_batch")
    assert "56" in i.fix and "64" in i.fix


def test_sp_without_tp():
    i = issue(base(parallel={"dp": 8, "sp": True}), "parallel.sp")
    assert "sp = false" in i.fix


def test_interleaved_without_vpp():
    d = base(parallel={"dp": 4, "pp": 2, "schedule": "interleaved"})
    i = issue(d, "parallel.vpp")
    assert "vpp = 2" in i.fix


def test_interleaved_with_microbatches_not_divisible_by_pp():
    # dp 2 × micro 1: 6 micro-batches per step, pp = 4
    d = base(training={"global_batch": 12, "micro_batch": 1},
             parallel={"dp": 2, "pp": 4, "schedule": "interleaved", "vpp": 2})
    i = issue(d, "training.global_batch")
    assert "divisible by pp = 4" in i.problem and "global_batch = " in i.fix


def test_fp8_on_a100():
    d = base(cluster={"gpu": "A100-80GB"}, training={"global_batch": 64, "precision": "fp8"})
    i = issue(d, "training.precision")
    assert "bf16" in i.fix


def test_missing_required_field():
    d = base()
    d["model"] = {"layers": 2, "hidden": 64, "heads": 4, "ffn_hidden": 256, "vocab": 100}    # no seq_len
    i = issue(d, "model.seq_len")
    assert "add seq_len" in i.fix


def test_parallel_bogus_string():
    i = issue(base(parallel="bogus"), "parallel")
    assert '"auto"' in i.fix


def test_every_issue_is_reported_not_just_the_first():
    d = base(cluster={"gpu": "A100-80GB"}, training={"global_batch": 60, "precision": "fp8"},
             parallel={"dp": 8, "sp": True})
    with pytest.raises(SpecError) as exc:
        spec_from_dict(d)
    assert {"training.precision", "training.global_batch", "parallel.sp"} <= set(exc.value.fields())


@settings(max_examples=60, deadline=None)
@given(invalid_specs())
def test_any_invalid_spec_raises_spec_error_naming_its_field(case):
    data, field = case
    try:
        spec_from_dict(data)
    except SpecError as exc:           # any other exception type fails the test
        assert field in exc.fields()
        assert all(i.problem for i in exc.issues)
    else:
        pytest.fail(f"no SpecError for a spec broken at {field}")
