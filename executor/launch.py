"""`loom run SPEC`: start one process per GPU (or per CPU "rank") through torchrun.

One machine: `torchrun --standalone --nproc-per-node=<gpus_per_node> -m loom.executor.train SPEC`. Several
machines (cluster.nodes > 1): run `loom run` on every node with LOOM_RDZV_ENDPOINT=host:port (a node all can
reach) and optionally LOOM_RDZV_ID; torchrun's c10d rendezvous then forms the world (see docs/executor.md for
Slurm). The backend follows the spec's device: NCCL on CUDA, gloo on the CPU target (chosen in train.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from loom.spec import Spec, load_spec


def torchrun_command(spec: Spec, spec_path: str, extra_args: Sequence[str] = (),
                     env: dict[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    nproc = spec.cluster.gpus_per_node
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if spec.cluster.nodes == 1:
        cmd += ["--standalone", f"--nproc-per-node={nproc}"]
    else:
        cmd += [f"--nnodes={spec.cluster.nodes}", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={env['LOOM_RDZV_ENDPOINT']}", f"--rdzv-id={env.get('LOOM_RDZV_ID', 'loom')}"]
    return cmd + ["-m", "loom.executor.train", spec_path, *extra_args]


def cuda_problem(spec: Spec) -> str | None:
    """Why this machine cannot run the spec's GPUs (with the fix), or None when it can."""
    if spec.gpu.device != "cuda":
        return None
    import torch
    if not torch.cuda.is_available():
        return (f"cluster.gpu = {spec.cluster.gpu!r} needs CUDA, which this machine lacks. Fix: set "
                'cluster.gpu = "cpu" (gloo processes, gpus_per_node = number of processes).')
    if torch.cuda.device_count() < spec.cluster.gpus_per_node:
        return (f"cluster.gpus_per_node = {spec.cluster.gpus_per_node} but this machine has "
                f"{torch.cuda.device_count()} GPUs. Fix: set gpus_per_node to at most that.")
    return None


def overlap_problem(spec: Spec) -> str | None:
    """The executor does not run Megatron-LM's communication overlaps the simulator models (userbuffers TP/GEMM
    overlap; the parameter all-gather deferred to the next forward): such a spec is for simulate/search/export."""
    p = spec.plan
    on = [f for f in ("tp_comm_overlap", "overlap_param_gather") if getattr(p, f)]
    if not on:
        return None
    return (f"parallel.{on[0]} = true is simulated and exported (loom simulate/search/export) but not executed: "
            f"Loom's executor runs TP collectives and the ZeRO parameter gather without these overlaps. Fix: set "
            + " and ".join(f"parallel.{f} = false" for f in on) + " to run or verify this plan.")


def executor_problem(spec: Spec) -> str | None:
    """Why the executor cannot run this spec here (with the fix), or None: overlaps it does not implement, or
    the GPUs this machine lacks. `loom run` and `loom verify` both refuse with it."""
    return overlap_problem(spec) or cuda_problem(spec)


def run_from_cli(spec_path: str, steps: int | None = None, extra_args: Sequence[str] = ()) -> int:
    """Launch the spec's training run; returns the exit code (0 on success). Spec errors raise SpecError."""
    spec = load_spec(spec_path)
    if spec.parallel == "auto":
        print('loom run: parallel = "auto" - search for a plan first (loom search) and write it into the spec',
              file=sys.stderr)
        return 2
    if (problem := overlap_problem(spec)) is not None:       # a property of the spec: before any machine check
        print(f"loom run: {problem}", file=sys.stderr)
        return 2
    if spec.cluster.nodes > 1 and "LOOM_RDZV_ENDPOINT" not in os.environ:
        print(f"loom run: cluster.nodes = {spec.cluster.nodes}; start `loom run` on every node with "
              "LOOM_RDZV_ENDPOINT=<host:port of node 0> (see docs/executor.md, multi-node)", file=sys.stderr)
        return 2
    if (problem := executor_problem(spec)) is not None:
        print(f"loom run: {problem}", file=sys.stderr)
        return 2
    args = list(extra_args) + (["--steps", str(steps)] if steps else [])
    env = dict(os.environ)
    if spec.gpu.device == "cpu":      # share the cores between the CPU ranks instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.cluster.gpus_per_node)))
    return subprocess.run(torchrun_command(spec, spec_path, args, env), env=env).returncode
