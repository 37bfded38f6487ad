"""The CLI end to end: exit codes, named errors instead of tracebacks, the JSON contract, no torch in simulate."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loom.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))

GOOD = """
[model]
preset = "llama3-8b"
[cluster]
gpu = "H100-SXM"
gpus_per_node = 8
nodes = 1
[training]
global_batch = 64
micro_batch = 1
[parallel]
dp = 1
tp = 8
sp = true
"""


def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "spec.toml"
    p.write_text(text)
    return str(p)


def test_validate_ok_prints_derived_numbers(tmp_path, capsys):
    assert main(["validate", _write(tmp_path, GOOD)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "8,030,261,248" in out and "524,288" in out  # params; 64 × 8192 tokens per step


@pytest.mark.parametrize("text, field", [
    (GOOD.replace("tp = 8", "tp = 3"), "parallel.tp"),
    (GOOD.replace('gpu = "H100-SXM"', 'gpu = "H1OO"'), "cluster.gpu"),
    (GOOD.replace("[training]", "[training\n"), "file"),
    (GOOD.replace("global_batch = 64", 'global_batch = "lots"'), "training.global_batch"),
    (GOOD.replace("micro_batch = 1", "micro_bach = 1"), "training.micro_bach"),
])
def test_bad_specs_exit_2_with_named_field(tmp_path, capsys, text, field):
    assert main(["validate", _write(tmp_path, text)]) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err and "Fix:" in err


def test_missing_file_is_a_named_error(capsys):
    assert main(["validate", "/nonexistent/spec.toml"]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_simulate_json_contract(tmp_path, capsys):
    assert main(["simulate", _write(tmp_path, GOOD), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["params"] == 8_030_261_248
    mem = r["memory"]
    assert mem["peak_bytes"] == max(s["peak"] for s in mem["per_stage"])
    assert r["step_time_s"] > 0 and 0 < r["mfu"] < 1 and set(r["exposed_comm_s"]) == {"tp", "cp", "pp", "dp"}
    assert isinstance(mem["fits"], bool) and len(mem["per_stage"]) == 1


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_validates_and_simulates(path, capsys):
    assert main(["validate", str(path)]) == 0
    assert main(["simulate", str(path)]) == 0
    assert "Memory per GPU" in capsys.readouterr().out


def test_simulate_does_not_import_torch(tmp_path):
    code = ("import sys; from loom.cli import main; "
            f"rc = main(['simulate', {_write(tmp_path, GOOD)!r}, '--json']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'simulate imported torch'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_simulate_with_a_calibrated_profile(capsys):
    tiny = str(ROOT / "examples" / "tiny-cpu.toml")
    assert main(["simulate", tiny, "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["simulate", tiny, "--json", "--profile", str(ROOT / "examples/profiles/cpu-2core-gloo.json")]) == 0
    calibrated = json.loads(capsys.readouterr().out)
    assert calibrated["profile"].endswith("cpu-2core-gloo.json")
    assert calibrated["step_time_s"] != default["step_time_s"]        # the measured machine, not the catalog
    assert calibrated["memory"] == default["memory"]                   # a profile changes time, not memory
    assert main(["simulate", tiny, "--profile", "/nonexistent/profile.json"]) == 2
    assert "loom calibrate" in capsys.readouterr().err


def test_simulate_stack_loom_counts_what_loom_run_keeps(capsys):
    """`--stack loom`: the memory rows of Loom's executor (its kernels; on one GPU without TP the fused linear
    cross-entropy: no fp32 log-probs, no (T, v) gradients), the figures `loom run`'s fit check and `loom verify`'s
    CUDA rows use; the default is the production stack. Without torch, like plain simulate."""
    from dataclasses import replace

    from loom.simulator.memory import memory_report
    from loom.spec import load_spec
    from loom.verify_predict import EXECUTOR_ACTIVATIONS
    path = ROOT / "examples" / "llama-1.5b-h200.toml"
    assert main(["simulate", str(path), "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["simulate", str(path), "--json", "--stack", "loom"]) == 0
    loom = json.loads(capsys.readouterr().out)
    want = memory_report(load_spec(path), replace(EXECUTOR_ACTIVATIONS, loss="fused_chunked"))
    assert (default["stack"], loom["stack"]) == ("default", "loom")
    assert loom["memory"]["peak_bytes"] == want.peak_bytes < default["memory"]["peak_bytes"] - 10 * 2**30
    assert loom["step_time_s"] == default["step_time_s"]                # memory only
    assert main(["simulate", str(path), "--stack", "loom"]) == 0
    assert "counting what `loom run` keeps" in capsys.readouterr().out
    code = ("import sys; from loom.cli import main; "
            f"rc = main(['simulate', {str(path)!r}, '--json', '--stack', 'loom']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'simulate --stack loom imported torch'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
