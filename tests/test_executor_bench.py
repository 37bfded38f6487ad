"""benchmarks/train_gpu.py: its no-CUDA exit and its tiny CPU run both work (the GPU run needs a GPU)."""
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
def test_train_gpu_cpu_smoke_prints_the_table_last():
    r = subprocess.run([sys.executable, "-W", "ignore", str(SCRIPT), "--cpu-smoke", "--steps", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-2:]
    assert last[0].startswith("loom executor") and last[1].startswith("plain PyTorch")
