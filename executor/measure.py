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
- Activations: bytes saved for backward during one micro-batch's forward, via
  `torch.autograd.graph.saved_tensors_hooks`, deduplicated by storage; split into the transformer layers' part
  (between a Block's forward pre-hook and forward hook) and the rest (embedding, final norm, head, loss). Parameters
  saved for backward are not activations and are left out. Also the peak of the saved bytes alive at once over the
  step (what the schedule keeps in flight).
- CUDA: `torch.cuda.max_memory_allocated` / `max_memory_reserved` per rank over the measured steps.

Every layout runs through `executor.train.Trainer.step` itself (pp/cp through its `pp_stage.Stage`), on the spec's
data, with `on_op` reporting each op of the program (ops that run inside a forward/backward, and the DP waits
under pp/cp, get zero length there).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from . import comm

# ---- clock -----------------------------------------------------------------------------------------------------
class Mark:
    """A CUDA event's place in `Clock.events`, resolved to seconds after the step (`Clock.resolve`)."""
    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i


class Clock:
    """Timestamps in seconds since `reset()`, comparable across the ranks of one machine (each rank resets right
    after a barrier). CPU: `time.perf_counter()` (CLOCK_MONOTONIC). CUDA: an event recorded on the current stream
    (no synchronization, so overlap is kept), returned as a `Mark` and resolved after the step as the time elapsed
    since a reference event recorded at `reset()` (which synchronizes once)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.t0 = time.perf_counter()
        self.events: list = []
        self.ref = None

    def reset(self) -> None:
        self.sync()
        self.t0 = time.perf_counter()
        if self.cuda:
            self.events = []
            self.ref = torch.cuda.Event(enable_timing=True)
            self.ref.record()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def host(self) -> float:
        """Host time since reset (for times the executor itself took with perf_counter)."""
        return time.perf_counter() - self.t0

    def now(self) -> float | Mark:
        if not self.cuda:
            return time.perf_counter() - self.t0
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.events.append(ev)
        return Mark(len(self.events) - 1)

    def resolve(self, x: float | Mark) -> float:
        """Seconds since reset; call after `sync()` when marks are pending."""
        if isinstance(x, Mark):
            return self.ref.elapsed_time(self.events[x.i]) / 1e3
        return x


class StampedRecords(list):
    """A list for `comm.LOG.records` that stamps when each record arrives (= the end of its call or wait). The start
    is the end minus the record's host-measured time: exact on CPU (gloo calls block), approximate on CUDA (NCCL
    calls return once queued)."""

    def __init__(self, clock: Clock):
        super().__init__()
        self.clock = clock
        self.ends: list = []

    def append(self, rec) -> None:           # noqa: D102 - list.append plus a timestamp
        self.ends.append(self.clock.now())
        super().append(rec)

    def clear(self) -> None:
        super().clear()
        self.ends.clear()

    def dump(self) -> list[dict]:
        out = []
        for r, e in zip(self, self.ends):
            end = self.clock.resolve(e)
            out.append({"kind": r.kind, "group": r.group, "bytes": int(r.bytes), "tag": r.tag, "world": r.world,
                        "start": end - r.time_s, "end": end})
        return out


# ---- saved activations --------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


class SavedTensors:
    """Bytes saved for backward, by storage. `region` says where the forward is ("layers" inside a Block, "other"
    elsewhere); parameters and buffers are excluded (their storages are model state). A storage is live from its first save
    until the backward has unpacked every saved reference to it (each is unpacked once by a backward without
    retain_graph); `step` adds its bytes each time it becomes live (so per micro-batch = step / micro-batches),
    `peak_live` is the most bytes live at once."""

    def __init__(self, params: list[torch.Tensor]):
        # The storage objects, not their addresses: ZeRO-3 frees and re-allocates the flat buffers (resize_), which
        # moves their data but keeps the objects.
        self.param_storages = [p.untyped_storage() for p in params]
        self.region = "other"
        self.step: dict[str, int] = {"layers": 0, "other": 0}
        self.live: dict[tuple[int, int], int] = {}        # storage -> packed references not yet unpacked
        self.live_bytes = 0
        self.peak_live = 0

    def new_step(self) -> None:
        self.step = {"layers": 0, "other": 0}
        self.peak_live = self.live_bytes

    def _pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key[1] == 0 or key[0] in {s.data_ptr() for s in self.param_storages}:
            return (None, t)
        if self.live.get(key, 0) == 0:
            # a storage becomes live: count it. (Counting by address over the whole step would miss storages the
            # allocator reuses for a later micro-batch after the backward freed the earlier one.)
            self.step[self.region] += key[1]
            self.live_bytes += key[1]
            self.peak_live = max(self.peak_live, self.live_bytes)
        self.live[key] = self.live.get(key, 0) + 1
        return (key, t)

    def _unpack(self, packed):
        key, t = packed
        if key is not None and key in self.live:
            self.live[key] -= 1
            if self.live[key] == 0:
                del self.live[key]
                self.live_bytes -= key[1]
        return t

    @contextmanager
    def hooks(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def watch_blocks(self, blocks: list[nn.Module]) -> None:
        def enter(*_):
            self.region = "layers"

        def leave(*_):
            self.region = "other"
        for b in blocks:
            b.register_forward_pre_hook(enter)
            b.register_forward_hook(leave)


# ---- model states -------------------------------------------------------------------------------------------------
def _bytes(tensors: list[torch.Tensor | None], seen: set) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        key = (s.data_ptr(), s.nbytes())
        if key[1] == 0 or key in seen:
            continue
        seen.add(key)
        total += key[1]
    return total


def state_bytes(dps: list, opt) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes of this rank (each storage once)."""
    seen: set = set()
    units = [u for dp in dps for u in dp.units]
    params = _bytes([u.flat for u in units] + [u.shard_param for u in units], seen)
    grads = _bytes([u.grad for u in units] + [u.shard_grad for u in units], seen)
    optim = _bytes(list(opt.m) + list(opt.v), seen)
    elements = sum(p.numel() for u in units for p in u.params)
    padded = sum(u.numel for u in units)
    return {"params": params, "grads": grads, "optimizer": optim, "param_elements": elements,
            "padded_elements": padded, "units": [u.numel for u in units]}


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
                          "saved_peak_bytes": run.saved.peak_live, "saved_layers_bytes": run.saved.step["layers"],
                          "saved_other_bytes": run.saved.step["other"]})
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
