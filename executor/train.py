"""The per-rank entry point: `python -m loom.executor.train SPEC [--steps N] [--out DIR]` under torchrun.

It initialises the process group (NCCL on CUDA, gloo for `gpu = "cpu"`), builds the mesh and a `Trainer`
(executor/trainer.py: how a rank runs the plan's program), resumes from the newest checkpoint (resharded first
when another [parallel] wrote it: `resume_path`), and logs each step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from loom.spec import Spec, SpecError, load_spec

from . import checkpoint
from .mesh import build_mesh
from .trainer import StepStats, Trainer, total_steps


# ---- console -------------------------------------------------------------------------------------------------
def _bar(done: int, total: int, width: int = 24) -> str:
    full = int(width * done / max(total, 1))
    return "[" + "#" * full + "." * (width - full) + f"] {done}/{total}"


def format_stats(s: StepStats, total: int) -> str:
    mem = s.mem_bytes / 2**30
    return (f"{_bar(s.step, total)} loss {s.loss:.4f} | gnorm {s.grad_norm:.3f} | lr {s.lr:.2e} | "
            f"{s.tokens_per_s:,.0f} tok/s | MFU {100 * s.mfu:.2f}% | mem {mem:.2f} GiB | {s.time_s * 1e3:.0f} ms"
            + (" | skipped (fp16 overflow)" if s.skipped else ""))


# ---- entry point ---------------------------------------------------------------------------------------------
def init_distributed(spec: Spec) -> torch.device:
    """Process group from torchrun's environment: NCCL on CUDA, gloo on the CPU target."""
    cpu = spec.gpu.device == "cpu"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu") if cpu else torch.device("cuda", local)
    if not cpu:
        if not torch.cuda.is_available():
            raise ValueError(f"cluster.gpu = {spec.cluster.gpu!r} needs CUDA, which this machine lacks; "
                               'use cluster.gpu = "cpu" to run on CPU processes')
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo" if cpu else "nccl")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != spec.plan.size:
        raise ValueError(f"launched {world} processes but the plan needs dp·tp·pp·cp = {spec.plan.size}; start "
                         f"it with loom run (nproc = cluster.gpus_per_node)")
    return device


def _describe(spec: Spec) -> str:
    p = spec.plan
    return (f"dp {p.dp}, tp {p.tp}{' sp' if p.sp else ''}, pp {p.pp}"
            f"{' ' + p.schedule if p.pp > 1 else ''}, cp {p.cp}, zero {p.zero}, {spec.training.precision}")


def resume_path(ck: Path, spec: Spec) -> Path:
    """The checkpoint this run loads: `ck` itself when it was written by this layout (or has no recorded spec:
    then Trainer.load checks the layout), else its copy resharded to this layout (executor/reshard.py), made by rank
    0 into a sibling directory while the other ranks wait (reused when a complete one exists). Collective."""
    from .reshard import check_compatible, layout, read_spec, reshard, same_layout
    src = read_spec(ck)
    if src is None:
        return ck
    check_compatible(src, spec)                        # on every rank: all raise the same clear error
    if same_layout(src, spec):
        return ck
    target = checkpoint.resharded_dir(ck, layout(spec).tag())
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    err = [None]
    if rank0 and not checkpoint.complete(target):
        try:
            reshard(ck, src, spec, target)
            print(f"loom run: resharded {ck} ({_describe(src)}) into {target} ({_describe(spec)})", flush=True)
        except Exception as exc:                       # noqa: BLE001 - every rank must hear of it, not hang
            err = [f"resharding {ck} to this [parallel] failed: {type(exc).__name__}: {exc}"]
    if dist.is_initialized():
        dist.broadcast_object_list(err, src=0)
    if err[0]:
        raise ValueError(err[0])
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loom.executor.train", description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: run.steps)")
    ap.add_argument("--out", default=None, help="output directory (default: run.out_dir)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (SpecError, ValueError, NotImplementedError) as exc:   # the user's to fix: say what, no traceback
        if os.environ.get("LOOM_DEBUG"):
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"loom run: {exc}", file=sys.stderr, flush=True)
        return 2


def _run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    torch.manual_seed(spec.training.seed)
    if spec.gpu.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
    device = init_distributed(spec)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    steps = total_steps(spec, args.steps)
    out = args.out or spec.run.out_dir
    mesh = build_mesh(spec.plan, device.type)
    trainer = Trainer(spec, mesh, device, steps)
    if out and spec.run.resume and (ck := checkpoint.latest(out)) is not None:
        ck = resume_path(ck, spec)
        trainer.load(ck)
        if rank0:
            print(f"resumed from {ck} at step {trainer.step_no}", flush=True)
    log = None
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        log = open(Path(out) / "metrics.jsonl", "a") if rank0 else None
    if rank0 and not args.quiet:
        m = spec.model
        print(f"loom run: {m.name} {m.param_count() / 1e6:.2f}M params, {spec.plan.size} ranks "
              f"(dp {spec.plan.dp}, tp {spec.plan.tp}{', sp' if spec.plan.sp else ''}, pp {spec.plan.pp}"
              f"{' ' + spec.plan.schedule if spec.plan.pp > 1 else ''}, cp {spec.plan.cp}, zero {spec.plan.zero}), "
              f"{trainer.n_micro} micro-batches/step, {steps} steps on {device.type}", flush=True)
    if rank0 and trainer.step_no >= steps:
        print(f"loom run: already at step {trainer.step_no} >= {steps} steps; nothing to do (raise --steps or "
              "run.steps to continue)", flush=True)
    while trainer.step_no < steps:
        s = trainer.step()
        if log:
            log.write(json.dumps(asdict(s)) + "\n")
            log.flush()
        if rank0 and not args.quiet and (s.step % spec.run.log_every == 0 or s.step == steps):
            print(format_stats(s, steps), flush=True)
        every = spec.run.checkpoint_every
        if out and ((every and s.step % every == 0) or s.step == steps):
            trainer.save(out)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
