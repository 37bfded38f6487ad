"""The memory model against the measured peaks of published runs (benchmarks/memory_accuracy.py).

Bounds asserted (what the model honestly achieves, recorded in docs/measurements.md). Tightened 2026-11-28 after
the loss terms (simulator/memory.py _logits_bytes: torch's loss_parallel under TP, torch.compile's fused loss in
torchtitan's June 2025 runs, the head's all-gathered input under DTensor SP), which moved the 70B 2D runs from
-27.6 / -23.0 % to -13.6 / -8.1 % and the two H200 runs from +37.7 / +35.9 % to +3.5 / +1.0 %:
- runs with full activation recomputation: median absolute error under 10 %, and every run within 15 % (the worst
  are under-predicted: 405B cp8 -14.3 %, 70B 2D -13.6 %, 405B 1F1B -11.8 %; docs/measurements.md says why);
- runs with torchtitan's per-op selective AC, mapped to Loom's "op" policy (the same save list): each of the
  eight within 10 %, median under 10 %;
- all 20 runs: median absolute error under 6 %, p90 under 15 %.
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
    assert max(abs(r.error) for r in full) < 0.15


def test_all_runs_median_error(rows):
    s = bench.summary(rows)
    assert s["median_abs_error"] < 0.06
    assert s["p90_abs_error"] < 0.15


def test_per_op_sac_runs_within_bounds(rows):
    sac = [r for r in rows if r.recompute == "op"]
    assert len(sac) == 8
    assert bench.summary(sac)["median_abs_error"] < 0.10
    h200 = [r for r in sac if "h200" in r.run_id]
    h100 = [r for r in sac if "h200" not in r.run_id]
    assert len(h200) == 2 and len(h100) == 6
    assert all(abs(r.error) < 0.10 for r in h100 + h200)


def test_loss_mapping_rule():
    """The loss implementation each run gets (benchmarks/memory_accuracy.py assumptions_for): eager at torchtitan
    9dec370 (loss_parallel under TP), compiled at e7c0cae with --training.compile."""
    import json
    runs = {r["id"]: r for r in json.loads(bench.RUNS.read_text())}
    loss = {k: bench.assumptions_for(r).loss for k, r in runs.items() if r["measured"].get("peak_mem_GB")}
    assert loss["torchtitan_t1_8b_8gpu_FSDP+compile"] == "unfused"
    assert loss["torchtitan_t4_70b_256gpu_2D"] == "loss_parallel"
    assert loss["torchtitan_h200_8b_32gpu"] == "compiled"
    assert sorted(set(loss.values())) == ["compiled", "loss_parallel", "unfused"]


def test_recompute_mapping_rule():
    assert [bench.recompute_for(s) for s in ("full", "selective (per-op SAC)", "selective (per-op SAC, default)",
                                              "selective", None)] == ["full", "op", "op", "selective", "none"]
