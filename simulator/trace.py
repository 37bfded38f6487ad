"""Timelines out: Chrome/Perfetto trace JSON and a Gantt PNG of the pipeline schedule.

Trace format: the Trace Event Format's complete events ("ph": "X", microsecond "ts"/"dur"), one process per rank
class (pid = stage), one thread per stream; open in ui.perfetto.dev or chrome://tracing.
"""
from __future__ import annotations

import json
from pathlib import Path

from .engine import Slice

_STREAMS = {"compute": 0, "comm": 1, "p2p": 2}


def _lines(report_or_timeline) -> dict[str, list[Slice]]:
    return getattr(report_or_timeline, "timelines", report_or_timeline)


def chrome_trace(report_or_timeline) -> dict:
    events: list[dict] = []
    for pid, (rc, slices) in enumerate(_lines(report_or_timeline).items()):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": rc}})
        for stream, tid in _STREAMS.items():
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": stream}})
        for s in slices:
            op = s.op
            events.append({"ph": "X", "name": op.label, "cat": op.kind.value, "pid": pid,
                           "tid": _STREAMS[op.stream], "ts": s.start_s * 1e6, "dur": s.duration_s * 1e6,
                           "args": {"kind": op.kind.value, "stage": op.stage, "chunk": op.chunk,
                                    "microbatch": op.microbatch, "layers": [op.layers.start, op.layers.stop],
                                    "flops": op.flops, "wire_bytes": op.wire_bytes, "count": op.count}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(report_or_timeline, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(report_or_timeline)))
    return path


_COLORS = {"forward": "#4c78a8", "backward": "#f58518", "recompute": "#b279a2", "optimizer": "#54a24b",
           "tp": "#e45756", "cp": "#72b7b2", "pp": "#9d755d", "dp": "#bab0ac"}


def plot_schedule(report_or_timeline, path: str | Path, title: str | None = None) -> Path:
    """Gantt chart: one row per (stage, stream), forward/backward boxes labelled with their micro-batch."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plot_schedule needs matplotlib: pip install 'loom[plot]' (or pip install matplotlib); "
                           "write_chrome_trace works without it") from e
    lines = _lines(report_or_timeline)
    rows = [(rc, st) for rc in lines for st in _STREAMS if any(s.op.stream == st for s in lines[rc])]
    fig, ax = plt.subplots(figsize=(14, 0.45 * len(rows) + 1.5))
    for y, (rc, st) in enumerate(rows):
        for s in lines[rc]:
            if s.op.stream != st or s.duration_s <= 0:
                continue
            key = s.op.kind.value if s.op.kind.is_compute else s.op.group or "pp"
            ax.barh(y, s.duration_s * 1e3, left=s.start_s * 1e3, color=_COLORS.get(key, "#888"), edgecolor="k",
                    linewidth=0.2)
            if s.op.kind.is_compute and s.op.microbatch >= 0:
                ax.text((s.start_s + s.duration_s / 2) * 1e3, y, str(s.op.microbatch), ha="center", va="center",
                        fontsize=6)
    ax.set_yticks(range(len(rows)), [f"{rc} {st}" for rc, st in rows])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title or "simulated step")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    ax.legend(handles, list(_COLORS), ncol=len(_COLORS), fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
