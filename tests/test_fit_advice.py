"""A plan that does not fit is an error with a fix: simulator/fit_advice.py and `loom simulate`'s exit status 3."""
from __future__ import annotations

import math
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from loom.cli import main
from loom.simulator.fit_advice import advise, states_floor
from loom.simulator.memory import memory_report
from loom.spec import parse_spec
from loom.spec.strategies import valid_specs
from loom.spec.validate import check

# Llama 3 8B, seq 8192, micro-batch 4, no recompute, plain DP: the activations alone are far beyond 80 GB.
TOO_BIG_ACTIVATIONS = """
[model]
preset = "llama3-8b"
[cluster]
gpu = "H100-SXM"
gpus_per_node = 8
[training]
global_batch = 64
micro_batch = 4
recompute = "none"
[parallel]
dp = 8
"""

# Llama 3 70B on 8 GPUs: model states exceed 80 GB per GPU whatever the plan.
NEVER_FITS = """
[model]
preset = "llama3-70b"
[cluster]
gpu = "H100-SXM"
gpus_per_node = 8
[training]
global_batch = 8
micro_batch = 1
[parallel]
dp = 8
"""


def _apply(spec, changes):
    par = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("parallel.")}
    tra = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("training.")}
    new = spec.with_parallel(**par) if par else spec
    return new.model_copy(update={"training": new.training.model_copy(update=tra)}) if tra else new


def test_alternatives_are_valid_and_fit_by_the_memory_model():
    spec = parse_spec(TOO_BIG_ACTIVATIONS)
    assert not memory_report(spec).fits
    adv = advise(spec)
    assert adv.alternatives, "a ZeRO-3 / smaller micro-batch plan of 8B fits on 8 H100s"
    for alt in adv.alternatives:
        new = _apply(spec, alt.changes)
        assert check(new) == []                                   # a plan the user can write
        rep = memory_report(new)                                  # recomputed, not taken from the advice
        assert rep.fits and rep.peak_bytes == alt.peak_bytes
        assert new.world_size == spec.world_size and new.training.global_batch == spec.training.global_batch
    assert all(a.step_time_s > 0 and 0 < a.mfu < 1 for a in adv.alternatives)


def test_no_plan_fits_when_the_sharded_model_states_exceed_the_gpu():
    spec = parse_spec(NEVER_FITS)
    adv = advise(spec)
    assert adv.alternatives == [] and not adv.any_plan_can_fit
    # Independent count: bf16 params (2 B) + fp32 gradients (4 B, Loom's default grad_dtype) + AdamW's fp32
    # master weights and two moments (12 B), all divided over the 8 GPUs (ZeRO paper §3: 2 + 2 + 12 with fp16 grads).
    assert spec.training.precision == "bf16" and spec.training.grad_dtype == "fp32"
    n = spec.model.param_count()
    assert adv.states_floor_bytes == math.ceil(n * (2 + 4 + 12) / 8)
    assert adv.states_floor_bytes > spec.gpu.hbm_bytes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_specs())
def test_no_plan_is_below_the_states_floor(spec):
    """Every parameter's states live on at least one GPU, so the fullest GPU holds at least the average."""
    assert memory_report(spec).peak_bytes >= states_floor(spec)


def test_simulate_exits_3_with_the_fields_to_change(tmp_path, capsys):
    path = tmp_path / "big.toml"
    path.write_text(TOO_BIG_ACTIVATIONS)
    assert main(["simulate", str(path)]) == 3
    out = capsys.readouterr()
    assert "Memory per GPU" in out.out                              # the report still shows why
    assert "does not fit" in out.err and "Fix:" in out.err and "parallel.zero = 3" in out.err
    assert "Traceback" not in out.err


def test_simulate_names_the_cluster_when_no_plan_can_fit(tmp_path, capsys):
    path = tmp_path / "never.toml"
    path.write_text(NEVER_FITS)
    assert main(["simulate", str(path)]) == 3
    err = capsys.readouterr().err
    assert "no plan on 8 GPUs can fit" in err and "cluster.nodes" in err


def test_json_carries_the_advice(tmp_path, capsys):
    import json
    path = tmp_path / "big.toml"
    path.write_text(TOO_BIG_ACTIVATIONS)
    assert main(["simulate", str(path), "--json"]) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["memory"]["fits"] is False and data["fit_advice"]["alternatives"]


def test_run_refuses_a_gpu_plan_that_does_not_fit_before_starting_anything(tmp_path, capsys):
    path = tmp_path / "big.toml"
    path.write_text(TOO_BIG_ACTIVATIONS)
    assert main(["run", str(path)]) == 3
    err = capsys.readouterr().err
    assert "not started" in err and "parallel.zero = 3" in err and "--ignore-memory-model" in err


def test_run_with_ignore_memory_model_goes_on_to_the_launch_checks(tmp_path, capsys):
    """Past the memory check, this CPU-only machine stops at the CUDA check (exit 2), still before any process."""
    path = tmp_path / "big.toml"
    path.write_text(TOO_BIG_ACTIVATIONS)
    rc = main(["run", str(path), "--ignore-memory-model"])
    err = capsys.readouterr().err
    assert rc == 2 and "not started" not in err and "CUDA" in err


def test_run_checks_the_executors_memory_not_simulates_default_stack(tmp_path, capsys):
    """The 1.5B example with per-op recompute on one A100-40GB: `loom simulate`'s default stack (eager SwiGLU,
    unfused loss: fp32 log-probs and their two gradients) needs 44 GiB, so it does not fit; Loom's executor (its
    kernels and, on one GPU, the fused linear cross-entropy: memory model loss "fused_chunked") needs ~33 GiB, so
    `loom run` passes the memory check and stops only at this machine's missing CUDA (exit 2)."""
    from loom.report import fit_report
    from loom.spec import load_spec
    text = (Path(__file__).resolve().parents[1] / "examples" / "llama-1.5b-h200.toml").read_text()
    path = tmp_path / "a100.toml"
    path.write_text(text.replace('gpu = "H200"', 'gpu = "A100-40GB"').replace('recompute = "none"', 'recompute = "op"'))
    spec = load_spec(path)
    assert fit_report(spec) is not None and fit_report(spec, stack="loom") is None
    assert main(["simulate", str(path)]) == 3
    capsys.readouterr()
    rc = main(["run", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "not started" not in err and "CUDA" in err
