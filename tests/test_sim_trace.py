"""Trace output: Chrome/Perfetto JSON and the optional Gantt PNG."""
from __future__ import annotations

import importlib.util
import json

import pytest

from loom.spec import ClusterSpec, ModelSpec, ParallelSpec, Spec, TrainingSpec
from loom.simulator import simulate_time, write_chrome_trace, plot_schedule


def _report():
    model = ModelSpec(layers=8, hidden=512, heads=8, ffn_hidden=2048, vocab=1000, seq_len=256)
    spec = Spec(model=model, cluster=ClusterSpec(gpus_per_node=8),
                training=TrainingSpec(global_batch=8, recompute="none"),
                parallel=ParallelSpec(pp=2, dp=2, tp=2, schedule="interleaved", vpp=2))
    return simulate_time(spec)


def test_chrome_trace_has_one_process_per_class_and_every_op(tmp_path):
    r = _report()
    path = write_chrome_trace(r, tmp_path / "t.json")
    events = json.loads(path.read_text())["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == len(r.plan)
    procs = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert procs == set(r.plan.rank_classes)
    f = next(e for e in slices if e["cat"] == "forward")
    assert f["name"].startswith("forward s") and "mb" in f["name"] and f["dur"] > 0
    assert max(e["ts"] + e["dur"] for e in slices) == pytest.approx(r.step_time_s * 1e6)


def test_plot_schedule_png_or_clear_error(tmp_path):
    r = _report()
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(RuntimeError, match="pip install"):
            plot_schedule(r, tmp_path / "g.png")
    else:
        out = plot_schedule(r, tmp_path / "g.png")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
