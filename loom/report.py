"""`loom simulate`'s report: the memory model and the step-time simulation of one plan in one JSON object."""
from __future__ import annotations

from typing import Any

from tabulate import tabulate

from loom.format import duration, gib, human_count
from loom.spec.spec import Spec


def _time_report(spec: Spec, price_per_gpu_hour: float | None, profile=None):
    from loom.simulator import simulate_time
    if price_per_gpu_hour is not None:
        cluster = spec.cluster.model_copy(update={"price_per_gpu_hour": price_per_gpu_hour})
        spec = spec.model_copy(update={"cluster": cluster})
    return simulate_time(spec, profile=profile)


def simulate_report(spec: Spec, price_per_gpu_hour: float | None = None, trace_path: str | None = None,
                    plot_path: str | None = None, profile_path: str | None = None) -> dict[str, Any]:
    """`profile_path`: a hardware profile written by `loom calibrate`, used instead of the catalog's defaults."""
    from loom.simulator.memory import memory_report
    mem = memory_report(spec)
    out: dict[str, Any] = {
        "model": spec.model.name,
        "params": spec.model.param_count(),
        "gpus": spec.world_size,
        "gpu": spec.gpu.name,
        "tokens_per_step": spec.tokens_per_step,
        "memory": mem.to_dict(),
    }
    profile = None
    if profile_path:
        from loom.simulator.hardware import HardwareProfile
        profile = HardwareProfile.load(profile_path)
        out["profile"] = profile_path
    timing = _time_report(spec, price_per_gpu_hour, profile)
    if timing is not None:
        out.update(timing.to_dict())
        if trace_path:
            from loom.simulator.trace import write_chrome_trace
            write_chrome_trace(timing, trace_path)
            out["trace"] = trace_path
        if plot_path:
            from loom.simulator.trace import plot_schedule
            plot_schedule(timing, plot_path)
            out["plot"] = plot_path
    return out


def format_report(spec: Spec, r: dict[str, Any]) -> str:
    mem = r["memory"]
    lines = [f"{r['model']}: {human_count(r['params'])} parameters on {r['gpus']} × {r['gpu']}"]
    rows = []
    cols = [k for k in _MEM_COLUMNS if k in mem["per_stage"][0]]
    for i, st in enumerate(mem["per_stage"]):
        rows.append([st.get("stage", i), st.get("layers", ""), f"{st.get('microbatches_in_flight', 0):.2f}"]
                    + [gib(st[k]) for k in cols])
    short = {"embedding_buffers": "embed", "logits_buffers": "logits", "comm_buffers": "comm", "optimizer": "optim",
             "activations": "activ", "workspace": "workspace"}
    headers = ["stage", "layers", "mb in flight"] + [short.get(c, c) for c in cols]
    lines.append("\nMemory per GPU (GiB)")
    lines.append(tabulate(rows, headers=headers, tablefmt="github"))
    verdict = "fits" if mem["fits"] else "DOES NOT FIT"
    lines.append(f"peak {gib(mem['peak_bytes'])} GiB of {gib(mem['hbm_bytes'])} GiB: {verdict} "
                 f"(headroom {gib(mem['headroom_bytes'])} GiB)")
    if "step_time_s" in r:
        t = [("step time", duration(r["step_time_s"])), ("tokens/s", f"{r['tokens_per_s']:,.0f}"),
             ("TFLOP/s per GPU", f"{r['tflops_per_gpu']:.1f}"), ("MFU", f"{100 * r['mfu']:.1f} %"),
             ("HFU", f"{100 * r['hfu']:.1f} %"), ("bubble", f"{100 * r['bubble_fraction']:.1f} %")]
        for kind, s in r.get("exposed_comm_s", {}).items():
            t.append((f"exposed {kind} comm", duration(s)))
        if r.get("time_to_train_s"):
            t.append(("time to train", duration(r["time_to_train_s"])))
        if r.get("cost_usd"):
            t.append(("cost to train", f"${r['cost_usd']:,.0f}"))
        lines.append("\nStep time")
        lines.append(tabulate(t, tablefmt="plain"))
    return "\n".join(lines)


_MEM_COLUMNS = ["params", "grads", "optimizer", "activations", "embedding_buffers", "logits_buffers", "workspace",
                "comm_buffers", "overhead", "peak"]
