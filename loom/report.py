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


def stack_assumptions(spec: Spec, stack: str):
    """The memory model's assumptions for `stack`: "default", the production stack the memory model describes
    (eager SwiGLU, an unfused fp32 loss: torchtitan-like; simulator/activations.py DEFAULT), or "loom", what
    `loom run` keeps on the spec's GPUs (its kernels and, on one GPU without TP, its fused loss:
    verify_predict.executor_assumptions; `loom run`'s own fit check uses it)."""
    if stack == "loom":
        from loom.verify_predict import executor_assumptions
        return executor_assumptions(spec, spec.gpu.device)
    from loom.simulator.activations import DEFAULT
    return DEFAULT


def simulate_report(spec: Spec, price_per_gpu_hour: float | None = None, trace_path: str | None = None,
                    plot_path: str | None = None, profile_path: str | None = None,
                    stack: str = "default") -> dict[str, Any]:
    """`profile_path`: a hardware profile written by `loom calibrate`, used instead of the catalog's defaults.
    `stack`: whose kernels the memory rows count (`stack_assumptions`)."""
    from loom.simulator.memory import memory_report
    assumptions = stack_assumptions(spec, stack)
    mem = memory_report(spec, assumptions)
    out: dict[str, Any] = {
        "model": spec.model.name,
        "params": spec.model.param_count(),
        "gpus": spec.world_size,
        "gpu": spec.gpu.name,
        "tokens_per_step": spec.tokens_per_step,
        "memory": mem.to_dict(),
        "stack": stack,
    }
    if not mem.fits:
        out["fit_advice"] = _fit_advice(spec, assumptions)
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


def _fit_advice(spec: Spec, assumptions) -> dict[str, Any]:
    from dataclasses import asdict
    from loom.simulator.fit_advice import advise
    a = advise(spec, assumptions)
    return {"states_floor_bytes": a.states_floor_bytes, "any_plan_can_fit": a.any_plan_can_fit,
            "alternatives": [asdict(x) for x in a.alternatives]}


def fit_report(spec: Spec, stack: str = "default") -> dict[str, Any] | None:
    """The parts of simulate's report that format_fit_advice reads, or None when the plan fits under `stack`'s
    assumptions (`stack_assumptions`)."""
    from loom.simulator.memory import memory_report
    assumptions = stack_assumptions(spec, stack)
    mem = memory_report(spec, assumptions)
    if mem.fits:
        return None
    return {"params": spec.model.param_count(), "gpus": spec.world_size, "memory": mem.to_dict(),
            "fit_advice": _fit_advice(spec, assumptions)}


def _changes(changes: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}" for k, v in changes.items())


def format_fit_advice(r: dict[str, Any]) -> str:
    """The error block for a plan that does not fit: which fields to change, or why no plan on this cluster can."""
    adv, mem = r["fit_advice"], r["memory"]
    short = gib(mem["peak_bytes"] - mem["hbm_bytes"])
    lines = [f"error: the plan does not fit: peak {gib(mem['peak_bytes'])} GiB per GPU, {short} GiB over the "
             f"{gib(mem['hbm_bytes'])} GiB of a {mem['gpu']}."]
    if adv["alternatives"]:
        lines.append("Fix: change the spec to one of these (nearest plans that fit, fastest first):")
        for a in adv["alternatives"]:
            lines.append(f"  - {_changes(a['changes'])}: peak {gib(a['peak_bytes'])} GiB, step "
                         f"{duration(a['step_time_s'])}, MFU {100 * a['mfu']:.1f} %")
        lines.append("  or run `loom search` on this file for the best plan overall.")
    elif adv["any_plan_can_fit"]:
        lines.append("Fix: no plan within two changes of this one fits; run `loom search` on this file (or set "
                     "parallel = \"auto\") to find one that does.")
    else:
        n = r["params"]
        lines.append(f"Fix: no plan on {r['gpus']} GPUs can fit: the parameters, gradients and optimizer states of "
                     f"{human_count(n)} parameters alone need {gib(adv['states_floor_bytes'])} GiB per GPU even "
                     f"sharded over all {r['gpus']} GPUs. Add GPUs (cluster.nodes), use a GPU with more memory "
                     "(cluster.gpu), or train a smaller model.")
    return "\n".join(lines)


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
    lines.append("\nMemory per GPU (GiB)" + (", counting what `loom run` keeps (--stack loom)"
                                                if r.get("stack") == "loom" else ""))
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
