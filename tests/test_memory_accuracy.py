"""The memory model against the measured peaks of published runs (benchmarks/memory_accuracy.py).

Bounds asserted (what the model honestly achieves, recorded in docs/measurements.md):
- runs with full activation recomputation (Loom models that policy exactly as torchtitan runs it): median
  absolute error under 10 %, and every run within 30 %;
- all 20 runs: median absolute error under 25 %;
- runs with torchtitan's per-op selective AC, which recomputes every second matmul and all elementwise ops and so
  keeps far less than Korthikanti's "selective": Loom's selective over-predicts every one of them (a
  conservative bound), and that is asserted too, so a change that silently flips the sign is noticed.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("memory_accuracy", ROOT / "benchmarks" / "memory_accuracy.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["memory_accuracy"] = bench          # dataclasses look their module up while the file executes
_spec.loader.exec_module(bench)

pytestmark = pytest.mark.skipif(not bench.RUNS.exists(), reason=f"reference data {bench.RUNS} not present")


@pytest.fixture(scope="module")
def rows():
    return bench.compare()


def test_all_measured_runs_are_compared(rows):
    assert len(rows) == 20


def test_full_recompute_runs_within_bounds(rows):
    full = [r for r in rows if r.recompute == "full"]
    assert len(full) == 12
    s = bench.summary(full)
    assert s["median_abs_error"] < 0.10
    assert max(abs(r.error) for r in full) < 0.30


def test_all_runs_median_error(rows):
    assert bench.summary(rows)["median_abs_error"] < 0.25


def test_selective_is_an_upper_bound_for_per_op_sac(rows):
    sac = [r for r in rows if r.recompute == "selective"]
    assert sac and all(r.error > 0 for r in sac)
