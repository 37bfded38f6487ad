"""Measure one rank while it runs the plan: per-op times, every collective, model-state and activation bytes.

`python -m loom.executor.measure SPEC --steps N --out FILE.json` under torchrun (what `loom verify` launches): every
rank runs N steps of its stage's program and writes `FILE.json.rank<r>`; rank 0 merges them into FILE.json.

What is measured, and how:
- Op times: the start and end of every op of `plan.program(stage)` from `Trainer.step(on_op=...)`, on a clock
  shared by the ranks of one machine (`time.perf_counter`, CLOCK_MONOTONIC on Linux; on CUDA the Trainer runs with
  profile=True, a synchronize after each op, so an op's end is its GPU work's end). Ops that run inside F/B (TP/SP collectives, CP
  exchanges, recompute) have no interval of their own: their collectives are in the comm records.
  A step starts after a barrier, so the ranks' times are comparable.
- Collectives: `executor.comm.LOG` records (kind, group, bytes, tag, time); the end of each call is stamped when
  the record is appended (on CUDA a CUDA event, resolved after the step), so its interval is [end - time_s, end].
- Model states (exact, from the tensors, deduplicated by storage): parameters (the flat fp32 buffers; ZeRO-3: the
  owned shard, and the gathered buffer only while allocated), gradients (flat accumulators while allocated and the
  reduced shards), optimizer states (AdamW m and v, SGD momentum). Measured after a step, in the steady state.
- Activations: bytes kept for backward during one micro-batch's forward, deduplicated by storage (`SavedTensors`):
  autograd's saved tensors (`torch.autograd.graph.saved_tensors_hooks`; under recompute these include
  torch.utils.checkpoint's inputs) and, for recompute = "op", the selective-checkpoint cache (executor/sac.py's
  policy keeps op outputs in a dict, not as saved tensors); split into the transformer layers' part (between a
  Block's forward pre-hook and forward hook, plus the checkpoint's saved Block input) and the rest (embedding, final
  norm, head, loss). Parameters and buffers saved for backward are model state and are left out. Also the peak of
  the kept bytes alive at once over the step (what the schedule keeps in flight) and, under recompute, the most
  bytes one checkpoint's recompute adds during the backward (torch.utils.checkpoint's recomputed tensors, counted
  until unpacked) over what was live when that backward began.
- CUDA: `torch.cuda.max_memory_allocated` / `max_memory_reserved` per rank over the measured steps.

Every layout runs through `executor.train.Trainer.step` itself (pp/cp through its `pp_stage.Stage`), on the spec's
data, with `on_op` reporting each op of the program (ops that run inside a forward/backward, and the DP waits
under pp/cp, get zero length there).

Modules: this one drives the steps and writes the JSON; executor/measure_timeline.py (clock, stamped collectives),
executor/measure_activations.py (saved activations, checkpoint/SAC hooks), executor/measure_state.py (model states).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import comm
# The measured quantities live in one module each; re-exported here so `loom.executor.measure` keeps its names.
from .measure_activations import SavedTensors
from .measure_state import state_bytes
from .measure_timeline import Clock, Mark, StampedRecords  # noqa: F401


# ---- the two drivers ---------------------------------------------------------------------------------------------
@dataclass
class OpTimes:
    """(op id, start, end) of the ops run as a unit, in program order."""
    rows: list[tuple[int, float, float]] = field(default_factory=list)


@dataclass
class _Run:
    """What the driver hands to `measure`: the DataParallel wrapper(s) and optimizer (model states), the saved-tensor
    counter, and `one_step(step) -> OpTimes`."""
    dps: list
    opt: Any
    saved: SavedTensors
    one_step: Callable[[int], OpTimes]


def _trainer_driver(spec, mesh, device, steps: int, clock: Clock) -> _Run:
    """executor.train.Trainer for every layout (pp/cp through its pp_stage.Stage), timed by its `on_op` hook.
    On CUDA the Trainer runs with profile=True (a synchronize after each op), so that each op's end is the end of
    its GPU work; this removes overlap between consecutive ops."""
    from .model import Block
    from .trainer import Trainer
    trainer = Trainer(spec, mesh, device, steps, profile=device.type == "cuda")
    saved = SavedTensors(list(trainer.model.parameters()) + list(trainer.model.buffers()))
    saved.watch_blocks([mod for mod in trainer.model.modules() if isinstance(mod, Block)])
    program = list(trainer.program)

    def one_step(step: int) -> OpTimes:
        times = OpTimes()
        with saved.hooks():
            trainer.step(on_op=lambda op, a, b: times.rows.append((op.id, a - clock.t0, b - clock.t0)))
        if len(times.rows) != len(program):
            raise RuntimeError(f"measure: Trainer.step reported {len(times.rows)} of the program's {len(program)} "
                               "ops through on_op")
        times.rows.sort(key=lambda r: r[1])
        return times
    return _Run([trainer.dp], trainer.opt, saved, one_step)


# ---- the measurement -------------------------------------------------------------------------------------------
def measure(spec, steps: int, device: torch.device) -> dict[str, Any]:
    """Run `steps` steps on this rank (step 0 is warm-up, not averaged) and return what was measured."""
    from .mesh import build_mesh
    clock = Clock(device)
    records = StampedRecords(clock)
    comm.LOG.records = records
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    run = _trainer_driver(spec, build_mesh(spec.plan, device.type), device, steps, clock)
    driver = "executor.train.Trainer"
    from loom.spec.mesh import Mesh as SpecMesh
    coords = SpecMesh.from_spec(spec).coords(rank)
    out_steps = []
    cuda = device.type == "cuda"
    for step in range(steps):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        if dist.is_initialized():
            dist.barrier()
        records.clear()
        run.saved.new_step()
        clock.reset()
        times = run.one_step(step)
        end_mark = clock.now()
        clock.sync()
        end = clock.resolve(end_mark)
        rows = [[i, clock.resolve(a), clock.resolve(b)] for i, a, b in times.rows]
        out_steps.append({"time_s": end, "ops": rows, "comm": records.dump(),
                          "saved_peak_bytes": run.saved.peak_kept, "live_peak_bytes": run.saved.peak_live, "saved_layers_bytes": run.saved.step["layers"],
                          "saved_other_bytes": run.saved.step["other"],
                          "recompute_transient_bytes": run.saved.transient if run.saved.transient_known else None})
    mem = state_bytes(run.dps, run.opt)
    if cuda:
        mem["max_memory_allocated"] = int(torch.cuda.max_memory_allocated(device))
        mem["max_memory_reserved"] = int(torch.cuda.max_memory_reserved(device))
    comm.LOG.records = []
    return {"rank": rank, "world": world, "coords": coords, "stage": coords["pp"], "driver": driver,
            "device": str(device), "backend": dist.get_backend() if dist.is_initialized() else "none",
            "torch": torch.__version__, "steps": out_steps, "memory": mem}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loom.executor.measure", description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True, help="merged JSON written by rank 0 (ranks write OUT.rank<r>)")
    args = ap.parse_args(argv)
    from loom.spec import load_spec

    from .train import init_distributed
    spec = load_spec(args.spec)
    torch.manual_seed(spec.training.seed)
    if spec.gpu.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
    device = init_distributed(spec)
    result = measure(spec, max(1, args.steps), device)
    out = Path(args.out)
    Path(f"{out}.rank{result['rank']}").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
    if result["rank"] == 0:
        ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(result["world"])]
        out.write_text(json.dumps({"ranks": ranks}))
        for r in range(result["world"]):
            Path(f"{out}.rank{r}").unlink()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
