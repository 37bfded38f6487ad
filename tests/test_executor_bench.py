"""benchmarks/train_gpu.py and benchmarks/gpu_session.sh: the no-CUDA exit and the CPU smoke of the whole prepared
GPU session (the GPU run needs a GPU)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_gpu.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_train_gpu_without_cuda_exits_cleanly():
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "no CUDA" in r.stdout


@pytest.mark.slow
def test_gpu_session_cpu_smoke_runs_every_part(tmp_path):
    """benchmarks/gpu_session.sh --cpu-smoke: every part of the prepared GPU session at toy size (pytest -m gpu,
    kernels.py, train_gpu.py with two Loom runs in bf16 autocast, loom calibrate, loom verify), through the same
    package shim the device uses (the script fails unless loom.executor is imported from it), outputs in $OUT (at
    most 8 files, as the device returns), the summary table last."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh"), "--cpu-smoke"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "PY": sys.executable, "OUT": str(out)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"summary.txt", "train_gpu.log", "verify.log", "profile.json"} <= set(files), files
    summary = (out / "summary.txt").read_text()
    assert "through the shim" not in summary and "/loom/executor/trainer.py" in summary.splitlines()[0]
    rows = {line[:20].strip(): line[21:25].strip() for line in summary.splitlines()      # printf '%-20s %4s'
            if line.startswith(("pytest -m", "kernels.py", "train_gpu.py", "loom calibrate", "loom verify"))}
    assert len(rows) == 5, summary
    for name, rc in rows.items():            # rc 0, except verify: 1 = metrics outside tolerance (CPU timing)
        assert rc == "0" or (name == "loom verify" and rc == "1"), (name, rc, summary)
    assert "metric" in (out / "verify.log").read_text()
    tail = r.stdout.strip().splitlines()[-4:]
    assert [t.split(")")[0] for t in tail[:3]] == ["loom executor (none", "loom executor (op", "loom executor (full"]
    assert not any("failed" in t for t in tail[:3]), tail
    assert tail[3].startswith("plain PyTorch")


@pytest.mark.slow
def test_train_gpu_reports_a_failing_run_and_goes_on():
    """A run that fails (here an invalid recompute mode; on the GPU an OOM or a kernel that does not compile) is a
    'failed' row; the other runs still produce theirs (one GPU call must not be lost to one failure)."""
    r = subprocess.run([sys.executable, "-W", "ignore", str(SCRIPT), "--cpu-smoke", "--steps", "1",
                        "--loom-recompute", "bogus,none"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-3:]
    assert last[0].startswith("loom executor (bogus)") and "failed: SpecError" in last[0]
    assert last[1].startswith("loom executor (none)") and "failed" not in last[1]
    assert last[2].startswith("plain PyTorch")
