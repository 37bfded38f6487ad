"""Every collective the executor issues goes through here, so each one is recorded.

A record holds the kind (all_reduce, all_gather, reduce_scatter, ...), the mesh dimension name of the group
("dp", "tp", "dp+tp" ...), the bytes of the local buffer, the wall time of the call (for async calls: from issue
to the end of wait()), and a tag saying which plan op issued it. Verify holds these against the plan's
collective ops. Byte convention (matches nccl-tests' "size"): all_reduce/broadcast count the buffer; all_gather
and reduce_scatter count the *full* (gathered / pre-scatter) buffer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommRecord:
    kind: str
    group: str
    bytes: int
    time_s: float
    tag: str = ""
    world: int = 1


@dataclass(frozen=True)
class Group:
    """A named process group (a mesh dimension, or several flattened) with this rank's place in it."""
    name: str
    pg: object | None          # None: a group of one rank (no communication)
    size: int
    rank: int

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = Group("none", None, 1, 0)


class _Pending:
    def __init__(self, work, rec: CommRecord, t0: float, log: "CommLog"):
        self.work, self.rec, self.t0, self.log = work, rec, t0, log

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
            self.rec.time_s = time.perf_counter() - self.t0
            self.log.records.append(self.rec)


@dataclass
class CommLog:
    records: list[CommRecord] = field(default_factory=list)
    tag: str = ""                  # the plan op currently executing; set by the step loop

    def clear(self) -> None:
        self.records.clear()

    def summary(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """(tag, kind, group) -> (calls, bytes)."""
        out: dict[tuple[str, str, str], tuple[int, int]] = {}
        for r in self.records:
            n, b = out.get((r.tag, r.kind, r.group), (0, 0))
            out[(r.tag, r.kind, r.group)] = (n + 1, b + r.bytes)
        return out


LOG = CommLog()

# torch >= 2.10 renamed the single-tensor collectives (the old names warn); older torch only has the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _issue(kind: str, group: Group, nbytes: int, fn, async_op: bool):
    rec = CommRecord(kind, group.name, nbytes, 0.0, LOG.tag, group.size)
    t0 = time.perf_counter()
    work = fn(async_op)
    if async_op:
        return _Pending(work, rec, t0, LOG)
    rec.time_s = time.perf_counter() - t0
    LOG.records.append(rec)
    return None


def all_reduce(t: torch.Tensor, group: Group, op=dist.ReduceOp.SUM, async_op: bool = False):
    if not group.active:
        return _Pending(None, None, 0.0, LOG) if async_op else None
    return _issue("all_reduce", group, _nbytes(t),
                  lambda a: dist.all_reduce(t, op=op, group=group.pg, async_op=a), async_op)


def all_gather(out: torch.Tensor, inp: torch.Tensor, group: Group, async_op: bool = False):
    """Gather equal chunks along dim 0: out = cat(inp of every rank in group order)."""
    if not group.active:
        out.copy_(inp)
        return _Pending(None, None, 0.0, LOG) if async_op else None
    return _issue("all_gather", group, _nbytes(out),
                  lambda a: _all_gather_single(out, inp.contiguous(), group=group.pg, async_op=a), async_op)


def reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group: Group, async_op: bool = False):
    """Sum over the group, then this rank keeps chunk `group.rank` of dim 0."""
    if not group.active:
        out.copy_(inp)
        return _Pending(None, None, 0.0, LOG) if async_op else None
    return _issue("reduce_scatter", group, _nbytes(inp),
                  lambda a: _reduce_scatter_single(out, inp.contiguous(), group=group.pg, async_op=a), async_op)


def broadcast(t: torch.Tensor, group: Group, src_group_rank: int = 0) -> None:
    if not group.active:
        return
    _issue("broadcast", group, _nbytes(t),
           lambda a: dist.broadcast(t, group=group.pg, group_src=src_group_rank, async_op=a), False)
