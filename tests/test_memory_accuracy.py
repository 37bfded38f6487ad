"""The memory model against the measured peaks of published runs (benchmarks/memory_accuracy.py).

Bounds asserted (what the model honestly achieves, recorded in docs/measurements.md):
- runs with full activation recomputation (Loom models that policy exactly as torchtitan runs it): median
  absolute error under 10 %, and every run within 30 %;
- runs with torchtitan's per-op selective AC, mapped to Loom's "op" policy (the same save list): the six
  torchtitan docs/performance.md runs (Jan 2025) each within 10 %; the two June 2025 H200 runs (torch 2.8,
  torch.compile, float8 with FSDP float8 all-gather) are over-predicted by about 36-38 %, asserted as over-
  predicted and within 45 % so that a change in either direction is noticed; median of the eight under 10 %;
- all 20 runs: median absolute error under 10 %.
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
    assert bench.summary(rows)["median_abs_error"] < 0.10


def test_per_op_sac_runs_within_bounds(rows):
    sac = [r for r in rows if r.recompute == "op"]
    assert len(sac) == 8
    assert bench.summary(sac)["median_abs_error"] < 0.10
    h200 = [r for r in sac if "h200" in r.run_id]
    h100 = [r for r in sac if "h200" not in r.run_id]
    assert len(h200) == 2 and len(h100) == 6
    assert all(abs(r.error) < 0.10 for r in h100)
    assert all(0 < r.error < 0.45 for r in h200)


def test_recompute_mapping_rule():
    assert [bench.recompute_for(s) for s in ("full", "selective (per-op SAC)", "selective (per-op SAC, default)",
                                              "selective", None)] == ["full", "op", "op", "selective", "none"]
