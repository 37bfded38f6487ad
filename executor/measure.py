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
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._pytree import tree_flatten

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
    """Bytes kept for backward, by storage. `region` says where the forward is ("layers" inside a Block, "other"
    elsewhere); parameters and buffers are excluded (their storages are model state). Three holders are counted:
    - autograd's saved tensors (`saved_tensors_hooks`), including torch.utils.checkpoint's inputs, which it saves
      through `_NoopSaveInputs` just before calling the Block (so they are moved to "layers" when the Block's
      pre-hook sees its input among them);
    - the selective-checkpoint cache of recompute = "op" (executor/sac.py): the outputs its policy keeps are stored
      in a dict, not saved tensors; an entry is live until the recompute consumes it or the cache is freed;
    - during a backward, what a checkpoint's recompute rebuilds (torch/utils/checkpoint.py `_recomputation_hook`
      stores it per saved-tensor holder; live until the backward unpacks it).
    A storage is live from its first hold until every hold is released (one reference count per storage, whoever
    holds it), and "kept" while a forward hold (saved tensor, checkpoint input, cache entry) has it. `step` adds its
    bytes each time it becomes kept (so per micro-batch = step / micro-batches), `peak_kept` is the most bytes
    kept at once (what the schedule keeps in flight), `peak_live` the same with the recompute's holds, and
    `transient` the most live bytes a recompute adds: live bytes during a checkpoint's recompute minus live bytes
    when its backward first asked for a saved tensor (what the layer kept is already counted in the latter)."""

    def __init__(self, params: list[torch.Tensor]):
        # The storage objects, not their addresses: ZeRO-3 frees and re-allocates the flat buffers (resize_), which
        # moves their data but keeps the objects.
        self.param_storages = [p.untyped_storage() for p in params]
        self.region = "other"
        self.step: dict[str, int] = {"layers": 0, "other": 0}
        self.live: dict[tuple[int, int], int] = {}        # storage -> holds not yet released
        self.live_bytes = 0
        self.peak_live = 0
        self.kept: dict[tuple[int, int], int] = {}        # the same, forward holds only (not the recompute's)
        self.kept_bytes = 0
        self.peak_kept = 0
        self.transient = 0
        self.transient_known = True                         # False if torch's checkpoint internals moved
        self.fresh_other: dict[tuple[int, int], int] = {}  # storages kept in "other" since the last Block hook
        self.recompute_base: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # checkpoint frame ->
        # live bytes when its backward began (by the frame object: an id could be reused by a later frame)

    def new_step(self) -> None:
        self.step = {"layers": 0, "other": 0}
        self.peak_live = self.live_bytes
        self.peak_kept = self.kept_bytes
        self.transient = 0

    def _key(self, t: torch.Tensor) -> tuple[int, int] | None:
        key = _storage_key(t)
        if key[1] == 0 or key[0] in {s.data_ptr() for s in self.param_storages}:
            return None
        return key

    def _hold(self, key: tuple[int, int], count: bool = True) -> None:
        if count:
            if self.kept.get(key, 0) == 0:
                # a storage becomes kept: count it. (Counting by address over the whole step would miss storages
                # the allocator reuses for a later micro-batch after the backward freed the earlier one.)
                self.step[self.region] += key[1]
                if self.region == "other":
                    self.fresh_other[key] = key[1]
                self.kept_bytes += key[1]
                self.peak_kept = max(self.peak_kept, self.kept_bytes)
            self.kept[key] = self.kept.get(key, 0) + 1
        if self.live.get(key, 0) == 0:
            self.live_bytes += key[1]
            self.peak_live = max(self.peak_live, self.live_bytes)
        self.live[key] = self.live.get(key, 0) + 1

    def _release(self, key: tuple[int, int], count: bool = True) -> None:
        if count and key in self.kept:
            self.kept[key] -= 1
            if self.kept[key] == 0:
                del self.kept[key]
                self.kept_bytes -= key[1]
                self.fresh_other.pop(key, None)    # freed: its address may come back as another tensor
        if key in self.live:
            self.live[key] -= 1
            if self.live[key] == 0:
                del self.live[key]
                self.live_bytes -= key[1]

    def _pack(self, t: torch.Tensor):
        key = self._key(t)
        if key is not None:
            self._hold(key)
        return (key, t)

    def _unpack(self, packed):
        key, t = packed
        if key is not None:
            self._release(key)
        return t

    @contextmanager
    def hooks(self) -> Iterator[None]:
        import torch.utils.checkpoint as ckpt

        from . import sac
        saved = self
        base_ckpt, base_recomp, base_ctx = ckpt._checkpoint_hook, ckpt._recomputation_hook, sac.context_fn

        class CheckpointHook(base_ckpt):
            """Notes the live bytes when a checkpoint's backward first unpacks (before its recompute)."""
            def __init__(self, frame) -> None:
                super().__init__(frame)
                unpack = self.unpack_hook

                def unpack_hook(holder):
                    if frame not in saved.recompute_base:
                        saved.recompute_base[frame] = saved.live_bytes
                    return unpack(holder)
                self.unpack_hook = unpack_hook

        class RecomputationHook(base_recomp):
            """Counts what the recompute stores for each holder, until the holder's handle is dropped (unpacked)."""
            def __init__(self, frame_ref, gid) -> None:
                super().__init__(frame_ref, gid)
                pack = self.pack_hook

                def pack_hook(x):
                    frame = frame_ref()
                    try:
                        idx = frame.recomp_counter[gid]
                    except AttributeError:              # torch's internals changed: no transient measured
                        saved.transient_known = False
                        return pack(x)
                    try:
                        return pack(x)
                    finally:
                        holder = frame.weak_holders[idx]() if idx < len(frame.weak_holders) else None
                        handle = holder.handles.get(gid) if holder is not None else None
                        key = saved._key(x)
                        if handle is not None and key is not None:
                            saved._hold(key, count=False)
                            weakref.finalize(handle, saved._release, key, False)
                            base = saved.recompute_base.get(frame, saved.live_bytes)
                            saved.transient = max(saved.transient, saved.live_bytes - base)
                self.pack_hook = pack_hook

        def context_fn():
            fwd, rec = base_ctx()
            cache = _WatchedCache(saved)
            fwd.storage = rec.storage = cache
            return fwd, rec

        ckpt._checkpoint_hook, ckpt._recomputation_hook, sac.context_fn = CheckpointHook, RecomputationHook, context_fn
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            ckpt._checkpoint_hook, ckpt._recomputation_hook, sac.context_fn = base_ckpt, base_recomp, base_ctx

    def watch_blocks(self, blocks: list[nn.Module]) -> None:
        def enter(_mod, args):
            # torch.utils.checkpoint saved the Block's input (its `_NoopSaveInputs`) just before calling the Block,
            # while the region was still "other": it is what the layer keeps, so it moves to "layers"
            self.region = "layers"
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            key = _storage_key(x) if x is not None else None
            if key in self.fresh_other and key in self.kept:
                self.step["other"] -= key[1]
                self.step["layers"] += key[1]
            self.fresh_other.clear()

        def leave(*_):
            # always_call: a recompute stopped early (torch's checkpoint early stop) raises out of the Block
            self.region = "other"
            self.fresh_other.clear()
        for b in blocks:
            b.register_forward_pre_hook(enter)
            b.register_forward_hook(leave, always_call=True)


class _Entries(dict):
    """One op's entries of the selective-checkpoint cache (index -> output wrapped in _VersionWrapper, or a
    marker): holds the wrapped tensors' storages while stored; released when replaced (consumed by the recompute)
    or when the cache is freed with entries never consumed (the recompute stopped early before reaching them)."""

    def __init__(self, saved: SavedTensors):
        super().__init__()
        self.saved = saved
        self.held: dict[int, list] = {}
        weakref.finalize(self, _release_all, saved, self.held)

    def __setitem__(self, idx, entry) -> None:
        super().__setitem__(idx, entry)
        for key in self.held.pop(idx, []):
            self.saved._release(key)
        keys = []
        for w in tree_flatten(entry)[0]:
            val = getattr(w, "val", None)
            if isinstance(val, torch.Tensor) and (key := self.saved._key(val)) is not None:
                self.saved._hold(key)
                keys.append(key)
        if keys:
            self.held[idx] = keys


def _release_all(saved: SavedTensors, held: dict[int, list]) -> None:
    for keys in held.values():
        for key in keys:
            saved._release(key)
    held.clear()


class _WatchedCache(dict):
    """The selective-checkpoint storage (torch's `defaultdict(dict)`: op key -> entries) with watched entries."""

    def __init__(self, saved: SavedTensors):
        super().__init__()
        self.saved = saved

    def __missing__(self, key) -> _Entries:
        d = self[key] = _Entries(self.saved)
        return d


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
