"""`loom verify SPEC`: run the plan with the executor, simulate it, and put every prediction next to its measurement.

Flow: torchrun starts the spec's ranks on `loom.executor.measure` (as `loom run` starts `loom.executor.train`);
they run `--steps` steps and write one JSON file; this process simulates the same plan (`loom.simulator`, with
`--profile` if given) and builds one table: metric | predicted | measured | ratio | ok.

The rows themselves (which prediction each holds, tolerances) are built in loom/verify_compare.py; this module
launches the executor, formats the table, writes the trace and is the CLI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Re-exported: `loom.verify` keeps the names it always had (tests, spec/spec.py's docstring, docs).
from loom.verify_compare import (ACTIVATION_NOTE, DEFAULT_TOLERANCES, TRANSIENT_NOTE, Row,  # noqa: F401
                                 compare, tolerances)
from loom.verify_timeline import (_representatives, measured_exposed_comm,  # noqa: F401
                                  measured_slices)


# ---- running the executor -----------------------------------------------------------------------------------------
def measure_command(spec, spec_path: str, out: str, steps: int) -> list[str]:
    from loom.executor.launch import torchrun_command
    cmd = torchrun_command(spec, spec_path, ["--steps", str(steps), "--out", out])
    cmd[cmd.index("loom.executor.train")] = "loom.executor.measure"
    return cmd


def run_measurement(spec, spec_path: str, steps: int) -> dict:
    """Launch the ranks on loom.executor.measure and return their merged JSON."""
    with tempfile.TemporaryDirectory(prefix="loom-verify-") as d:
        out = str(Path(d) / "measured.json")
        env = dict(os.environ)
        if spec.gpu.device == "cpu":
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.cluster.gpus_per_node)))
        proc = subprocess.run(measure_command(spec, spec_path, out, steps), env=env, capture_output=True,
                              text=True)
        if proc.returncode != 0 or not Path(out).exists():
            raise RuntimeError(_failure(proc.returncode, proc.stderr))
        return json.loads(Path(out).read_text())


def _failure(code: int, stderr: str) -> str:
    """The ranks' own error message (the first `...Error: message` line a rank printed), not torchrun's traceback;
    LOOM_DEBUG=1 appends the stderr tail."""
    import re
    found = re.findall(r"^(?:\[rank\d+\]: )?(\w+(?:Error|Exception|Timeout)): (.+)$", stderr, flags=re.M)
    found = [(k, m) for k, m in found if k != "ChildFailedError" and "remote worker crashing" not in m]
    msg = f"{found[0][0]}: {found[0][1]}" if found else "see the output below"
    text = f"the executor failed (exit {code}): {msg}"
    if os.environ.get("LOOM_DEBUG") or not found:
        text += "\n" + stderr[-4000:]
    return text


# ---- output ---------------------------------------------------------------------------------------------------------
def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit in ("B", "n"):
        return f"{int(round(x)):,}"
    if unit == "s":
        return f"{x * 1e3:.2f} ms"
    if unit == "tok/s":
        return f"{x:,.0f}"
    return f"{x:.4g}"


def format_table(rows: list[Row]) -> str:
    from tabulate import tabulate
    body = []
    for r in rows:
        ok = {True: "ok", False: "FAIL", None: "-"}[r.ok]
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        tol = "report" if r.tolerance is None else ("exact" if r.tolerance == 0 else f"±{100 * r.tolerance:g}%")
        body.append([r.metric, _fmt(r.predicted, r.unit), _fmt(r.measured, r.unit), ratio, ok, tol,
                     _fmt(r.reference, r.unit) if r.reference is not None else "", r.note])
    return tabulate(body, headers=["metric", "predicted", "measured", "ratio", "ok", "tolerance", "plan/model",
                                   "note"], tablefmt="github")


def parse_tol(items: list[str] | None) -> dict[str, float | None]:
    """--tol name=value (value a fraction, or 'none' to report only)."""
    out: dict[str, float | None] = {}
    for item in items or []:
        name, _, value = item.partition("=")
        if name not in DEFAULT_TOLERANCES:
            raise ValueError(f"--tol {item}: unknown metric {name!r}; known: {', '.join(DEFAULT_TOLERANCES)}")
        try:
            out[name] = None if value.strip().lower() == "none" else float(value)
        except ValueError:
            raise ValueError(f"--tol {item}: the value must be a fraction such as 0.1, or none") from None
        if out[name] is not None and out[name] < 0:
            raise ValueError(f"--tol {item}: a tolerance cannot be negative")
    return out


def write_trace(spec, measured: dict, path: str) -> None:
    """The measured step (the last one) in the simulator's Perfetto layout, plus every collective on the comm
    thread of its rank class (loom.simulator.trace.chrome_trace)."""
    from loom.simulator.trace import chrome_trace
    from loom.spec.compile import compile_plan
    plan = compile_plan(spec)
    reps = _representatives(measured["ranks"])
    lines = {f"stage{s}": measured_slices(plan, r["steps"][-1])[0] for s, r in sorted(reps.items())}
    trace = chrome_trace(lines)
    for pid, (s, r) in enumerate(sorted(reps.items())):
        for rec in r["steps"][-1]["comm"]:
            trace["traceEvents"].append({"ph": "X", "name": f"{rec['kind']} {rec['group']}", "cat": "collective",
                                         "pid": pid, "tid": 1, "ts": rec["start"] * 1e6,
                                         "dur": (rec["end"] - rec["start"]) * 1e6,
                                         "args": {"bytes": rec["bytes"], "tag": rec["tag"]}})
    Path(path).write_text(json.dumps(trace))


def verify_cli(args) -> int:
    """`loom verify FILE [--profile P] [--steps N] [--json] [--tol name=value ...] [--trace FILE.json]`."""
    from loom.spec import load_spec
    spec = load_spec(args.file)
    if spec.parallel == "auto":
        print('loom verify: parallel = "auto" - search for a plan first (loom search) and write it into the spec',
              file=sys.stderr)
        return 2
    from loom.executor.launch import executor_problem, overlap_problem
    if (problem := overlap_problem(spec)) is not None:      # a property of the spec: before any machine check,
        print(f"loom verify: {problem}", file=sys.stderr)    # as `loom run` (executor/launch.py run_from_cli)
        return 2
    try:
        overrides = parse_tol(getattr(args, "tol", None))
    except ValueError as e:
        print(f"loom verify: {e}", file=sys.stderr)
        return 2
    profile = None
    if args.profile:
        from loom.simulator.hardware import HardwareProfile
        try:
            profile = HardwareProfile.load(args.profile)
        except (OSError, ValueError) as e:
            print(f"loom verify: --profile {args.profile}: {e}", file=sys.stderr)
            return 2
    if spec.cluster.nodes > 1:
        print(f"loom verify: cluster.nodes = {spec.cluster.nodes}; verify runs on one machine. Fix: verify a "
              "one-node version of the plan (nodes = 1), or use `loom run` on every node", file=sys.stderr)
        return 2
    if (problem := executor_problem(spec)) is not None:
        print(f"loom verify: {problem}", file=sys.stderr)
        return 2
    steps = max(1, args.steps)
    try:
        measured = run_measurement(spec, args.file, steps)
    except RuntimeError as e:
        print(f"loom verify: {e}", file=sys.stderr)
        return 1
    rows = compare(spec, measured, profile, tolerances(spec, overrides))
    if getattr(args, "trace", None):
        write_trace(spec, measured, args.trace)
    failed = [r for r in rows if r.ok is False]
    plan_rows = [r for r in rows if r.metric.startswith("comm bytes") and r.reference is not None]
    plan_differs = [r.metric for r in plan_rows if round(r.reference) != r.measured]
    if args.json:
        print(json.dumps({"spec": args.file, "steps": steps, "ranks": len(measured["ranks"]),
                          "device": measured["ranks"][0]["device"], "metrics": [r.to_dict() for r in rows],
                          "failed": [r.metric for r in failed],
                          "plan_comm_rows": {"equal": len(plan_rows) - len(plan_differs), "differ": plan_differs}},
                         indent=2))
    else:
        print(f"loom verify {args.file}: {len(measured['ranks'])} ranks on {measured['ranks'][0]['device']} "
              f"({measured['ranks'][0]['backend']}), {steps} steps")
        print(format_table(rows))
        print(f"\nplan (spec/compile.py) vs measured collective bytes: {len(plan_rows) - len(plan_differs)} equal"
              + (f", {len(plan_differs)} differ: " + ", ".join(plan_differs) if plan_differs else ""))
        print(f"{len(failed)} metric(s) outside tolerance" + (": " + ", ".join(r.metric for r in failed)
                                                               if failed else ""))
    return 1 if failed else 0
