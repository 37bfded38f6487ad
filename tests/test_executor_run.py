"""`loom run` end to end: torchrun, 2 gloo ranks, metrics, checkpoints, resume."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loom.executor.launch import run_from_cli

SPEC = """
[model]
layers = 1
hidden = 32
heads = 4
kv_heads = 2
ffn_hidden = 64
vocab = 257
seq_len = 32
[cluster]
gpu = "cpu"
gpus_per_node = 2
[training]
global_batch = 8
micro_batch = 2
precision = "fp32"
lr = 1e-2
lr_schedule = "wsd"
decay_fraction = 0.4
[parallel]
dp = 1
tp = 2
sp = true
[data]
mixture = {{ stdlib_code = 1.0 }}
decay_mixture = {{ stdlib_docs = 1.0 }}
[run]
out_dir = "{out}"
checkpoint_every = 2
"""


@pytest.mark.slow
def test_loom_run_trains_checkpoints_and_resumes(tmp_path, capfd):
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(out=tmp_path / "out"))
    assert run_from_cli(str(spec), steps=4) == 0
    assert run_from_cli(str(spec), steps=6) == 0                 # resumes from step 4, runs 5 and 6
    out = capfd.readouterr().out
    assert "resumed from" in out and "step_00000004" in out
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2              # it learns
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["mem_bytes"] > 0 for r in rows)
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == \
        ["step_00000002", "step_00000004", "step_00000006"]


def test_loom_run_on_a_cuda_spec_without_cuda_says_how_to_fix(tmp_path, capfd):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(out=tmp_path / "out").replace('gpu = "cpu"', 'gpu = "H100-SXM"'))
    assert run_from_cli(str(spec), steps=1) == 2
    assert 'cluster.gpu = "cpu"' in capfd.readouterr().err


def test_train_module_help_runs():
    r = subprocess.run([sys.executable, "-m", "loom.executor.train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--steps" in r.stdout


def test_train_entry_reports_user_errors_without_a_traceback(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(out=tmp_path / "out").replace("vocab = 257", "vocab = 200")
                    .replace("[data]\nmixture = { stdlib_code = 1.0 }\ndecay_mixture = { stdlib_docs = 1.0 }\n", "")
                    .replace("tp = 2\nsp = true", "tp = 1").replace("gpus_per_node = 2", "gpus_per_node = 1"))
    r = subprocess.run([sys.executable, "-m", "loom.executor.train", str(spec), "--steps", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "model.vocab" in r.stderr
