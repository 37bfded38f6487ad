"""The `loom` command line: validate, simulate, search, budget, export, run, calibrate, verify.

Every subcommand imports what it needs lazily so that `loom validate` and `loom simulate` never import torch
(the simulator answers in milliseconds). Bad input exits 2 with the named errors, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from loom.spec import SpecError, load_spec
from loom.spec.spec import Spec

EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3     # the report is printed (it shows why); the error block names the fix


def _print_errors(path: str, err: SpecError) -> int:
    print(f"{path}: {len(err.issues)} error(s)", file=sys.stderr)
    for issue in err.issues:
        print(f"  - {issue}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _load(path: str) -> Spec:
    return load_spec(path)


def _resolve_auto(spec: Spec) -> tuple[Spec, str | None]:
    """parallel = "auto": search for the best plan and say which."""
    if spec.parallel != "auto":
        return spec, None
    from loom.simulator.search import resolve_auto
    best, _ = resolve_auto(spec)
    p = best.plan
    return best, (f"parallel = \"auto\": chose dp={p.dp} tp={p.tp} pp={p.pp} cp={p.cp} sp={p.sp} zero={p.zero} "
                  f"schedule={p.schedule} vpp={p.vpp} micro_batch={best.training.micro_batch} "
                  f"recompute={best.training.recompute}")


# ---- validate ---------------------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    from tabulate import tabulate
    from loom.format import human_count
    spec = _load(args.file)
    m = spec.model
    rows = [("model", m.name), ("parameters", f"{m.param_count():,} ({human_count(m.param_count())})"),
            ("tokens per step", f"{spec.tokens_per_step:,}"), ("GPUs", spec.world_size),
            ("GPU", spec.gpu.name)]
    if spec.parallel != "auto":
        p = spec.plan
        rows += [("micro-batches per step (per DP replica)", spec.micro_batches),
                 ("plan", f"dp={p.dp} tp={p.tp} pp={p.pp} cp={p.cp} sp={p.sp} zero={p.zero} "
                          f"schedule={p.schedule} vpp={p.vpp}")]
    else:
        rows.append(("plan", "auto (loom search picks it)"))
    rows.append(("train FLOPs per token", f"{m.train_flops_per_token(spec.training.recompute):.4g}"))
    print(f"{args.file}: ok")
    print(tabulate(rows, tablefmt="plain"))
    return 0


# ---- simulate ---------------------------------------------------------------------------------------------
def cmd_simulate(args: argparse.Namespace) -> int:
    from loom.report import format_report, simulate_report
    spec, chosen = _resolve_auto(_load(args.file))
    try:
        report = simulate_report(spec, price_per_gpu_hour=args.price, trace_path=args.trace, plot_path=args.plot,
                                 profile_path=args.profile, stack=args.stack)
    except (OSError, ValueError) as exc:
        print(f"loom simulate: --profile {args.profile}: {exc}. Fix: give a file written by `loom calibrate`.",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    if chosen:
        report["auto"] = chosen
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        if chosen:
            print(chosen)
        print(format_report(spec, report))
    if "fit_advice" in report:
        if not args.json:
            from loom.report import format_fit_advice
            print(format_fit_advice(report), file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return 0


# ---- search -----------------------------------------------------------------------------------------------
def cmd_search(args: argparse.Namespace) -> int:
    from loom.simulator.search import format_search, search
    spec = _load(args.file)
    result = search(spec, by=args.by, top_k=args.top, progress=None if args.json else _progress_bar("search"))
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_search(result))
    return 0


def _progress_bar(label: str):
    def update(done: int, total: int) -> None:
        if not sys.stderr.isatty():
            return
        width = 30
        filled = int(width * done / max(total, 1))
        print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr)
        if done >= total:
            print(file=sys.stderr)
    return update


# ---- budget -----------------------------------------------------------------------------------------------
def cmd_budget(args: argparse.Namespace) -> int:
    from loom.simulator.budget import format_budget, plan_budget
    given = [x for x in (args.flops, args.gpu_hours, args.dollars) if x is not None]
    if len(given) != 1:
        print("loom budget: give exactly one of --flops, --gpu-hours or --dollars", file=sys.stderr)
        return EXIT_BAD_INPUT
    result = plan_budget(flops=args.flops, gpu_hours=args.gpu_hours, dollars=args.dollars, gpu=args.gpu,
                         num_gpus=args.gpus, gpus_per_node=args.gpus_per_node, price_per_gpu_hour=args.price,
                         inference_tokens=args.inference_tokens, search_plan=not args.no_search)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_budget(result))
    return 0


# ---- export -----------------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from loom.spec.export import export_megatron, export_torchtitan
    spec, chosen = _resolve_auto(_load(args.file))
    if chosen:
        print(f"# {chosen}")
    print(export_megatron(spec) if args.to == "megatron" else export_torchtitan(spec))
    return 0


# ---- run / calibrate / verify (need torch) ----------------------------------------------------------------
def _refuse_if_it_does_not_fit(spec: Spec) -> int | None:
    """On GPUs, a plan the memory model says does not fit is refused before any process starts (the same error
    block as `loom simulate`); `--ignore-memory-model` starts it anyway. CPU ranks have no HBM limit to check.
    The check counts what Loom's executor keeps (its kernels and, on one GPU without TP, its fused loss:
    `loom simulate --stack loom`), not simulate's default stack, so a plan the executor fits runs."""
    if spec.parallel == "auto" or spec.gpu.device != "cuda":
        return None
    from loom.report import fit_report, format_fit_advice
    report = fit_report(spec, stack="loom")
    if report is None:
        return None
    print(f"loom run: not started.\n{format_fit_advice(report)}\n"
          "(or pass --ignore-memory-model to start anyway: the model's accuracy is in docs/measurements.md)",
          file=sys.stderr)
    return EXIT_DOES_NOT_FIT


def cmd_run(args: argparse.Namespace) -> int:
    spec = _load(args.file)  # validate before starting any process
    if "--ignore-memory-model" in args.rest:             # after FILE, argparse's REMAINDER took it
        args.rest = [a for a in args.rest if a != "--ignore-memory-model"]
        args.ignore_memory_model = True
    if not args.ignore_memory_model and (rc := _refuse_if_it_does_not_fit(spec)) is not None:
        return rc
    from loom.executor.launch import run_from_cli
    return run_from_cli(args.file, steps=args.steps, extra_args=args.rest)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from loom.calibrate import calibrate_cli
    return calibrate_cli(args)


def cmd_verify(args: argparse.Namespace) -> int:
    _load(args.file)
    from loom.verify import verify_cli
    return verify_cli(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loom", description="Plan, cost, run and verify LLM pretraining layouts.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a spec; print the derived numbers")
    p.add_argument("file")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("simulate", help="memory per GPU and step time of a plan (no torch needed)")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    p.add_argument("--trace", metavar="FILE.json", help="write the simulated step as a Chrome/Perfetto trace")
    p.add_argument("--plot", metavar="FILE.png", help="draw the pipeline schedule (needs matplotlib)")
    p.add_argument("--price", type=float, metavar="USD", help="price per GPU-hour, for the cost to train")
    p.add_argument("--profile", metavar="P.json", help="hardware profile from `loom calibrate` (default: catalog)")
    p.add_argument("--stack", choices=("default", "loom"), default="default",
                   help="whose kernels the memory rows count: the production stack the memory model describes "
                        "(eager SwiGLU, unfused fp32 loss; default) or what `loom run` keeps (its kernels and, on one "
                        "GPU without TP, its fused loss)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("search", help="rank every valid plan for the spec's model, cluster and batch")
    p.add_argument("file")
    p.add_argument("--by", choices=["step_time", "tokens_per_gpu", "cost"], default="step_time")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("budget", help="turn a compute budget into a model size, tokens, a plan, days and dollars")
    p.add_argument("--flops", type=float)
    p.add_argument("--gpu-hours", type=float)
    p.add_argument("--dollars", type=float)
    p.add_argument("--gpu", default="H100-SXM")
    p.add_argument("--gpus", type=int, default=1024, help="GPUs in the cluster")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--price", type=float, default=2.0, help="USD per GPU-hour")
    p.add_argument("--inference-tokens", type=float, default=0.0, help="expected lifetime inference tokens")
    p.add_argument("--no-search", action="store_true", help="skip the plan search")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_budget)

    p = sub.add_parser("export", help="print the plan as Megatron-LM arguments or a torchtitan config")
    p.add_argument("file")
    p.add_argument("--to", choices=["megatron", "torchtitan"], required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="train for real with torchrun (gloo on CPU, NCCL on GPUs)")
    p.add_argument("file")
    p.add_argument("--steps", type=int)
    p.add_argument("--ignore-memory-model", action="store_true",
                   help="start even when the memory model says the plan does not fit the GPU")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="extra arguments passed to the trainer")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("calibrate", help="measure this machine and write a hardware profile")
    p.add_argument("--out", default="profile.json")
    p.add_argument("--seconds", type=float, default=60.0)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("verify", help="run the plan and compare every prediction with its measurement")
    p.add_argument("file")
    p.add_argument("--profile")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--tol", action="append", metavar="NAME=FRACTION", help="override a tolerance (or NAME=none)")
    p.add_argument("--trace", metavar="FILE.json", help="write the measured step as a Perfetto trace")
    p.set_defaults(func=cmd_verify)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as err:
        return _print_errors(getattr(args, "file", "spec"), err)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("loom."):
            print(f"loom {args.command}: not available in this build ({err.name} is missing)", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


if __name__ == "__main__":
    sys.exit(main())
