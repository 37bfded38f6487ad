"""The measured timeline's clock: timestamps comparable across the ranks of one machine (`Clock`, `Mark`) and the
collective log that stamps each record's end as it arrives (`StampedRecords`). Used by executor/measure.py."""
from __future__ import annotations

import time

import torch


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

