"""Point-to-point messages for pipeline and context parallelism: tagged, recorded, and waited on with a deadline.

Why a deadline: the plan guarantees a deadlock-free order, so a receive that never completes means the executor's
actions and the plan's disagree (or a peer died). Gloo's `Work.wait(timeout)` raises after the timeout; we turn that
into a `P2PTimeout` naming the stage and the op instead of hanging (NCCL honours the same argument).

Why tags: every message of a step gets a distinct tag built from (kind, micro-batch, chunk), so gloo matches a
receive to its own send even if two messages share a direction (interleaved schedules send activations and
gradients both ways). NCCL ignores tags and matches in posting order, which the plan's FIFO property guarantees
(spec/schedules.py docstring).

Every send/recv is appended to `executor.comm.LOG` as kind "send"/"recv" with the group's name and the bytes.
"""
from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

from .comm import LOG, CommRecord, Group

DEFAULT_TIMEOUT_S = 60.0


class P2PTimeout(RuntimeError):
    """A point-to-point operation did not complete in time: the plan and the executor disagree, or a peer failed."""


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class P2PRequest:
    """An issued isend/irecv. `wait()` returns the tensor (the received buffer for a recv)."""

    def __init__(self, work, tensor: torch.Tensor, rec: CommRecord, what: str, timeout_s: float):
        self.work, self.tensor, self.rec, self.what, self.timeout_s = work, tensor, rec, what, timeout_s
        self.t0 = time.perf_counter()

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            try:
                self.work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            except RuntimeError as e:
                raise P2PTimeout(f"{self.what} did not complete within {self.timeout_s:g} s: the executor's "
                                 f"actions and the plan's disagree, or the peer failed ({str(e)[:160]})") from e
            self.work = None
            self.rec.time_s = time.perf_counter() - self.t0
            LOG.records.append(self.rec)
        return self.tensor


def isend(t: torch.Tensor, group: Group, peer: int, tag: int, what: str,
          timeout_s: float = DEFAULT_TIMEOUT_S) -> P2PRequest:
    """Send `t` to group rank `peer`. Keep `t` alive (and unmodified) until the request is waited on."""
    t = t.contiguous()
    work = dist.isend(t, group=group.pg, group_dst=peer, tag=tag)
    return P2PRequest(work, t, CommRecord("send", group.name, _nbytes(t), 0.0, LOG.tag, group.size), what, timeout_s)


def irecv(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, group: Group, peer: int, tag: int,
          what: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> P2PRequest:
    """Receive a tensor of known shape and dtype from group rank `peer`."""
    buf = torch.empty(shape, dtype=dtype, device=device)
    work = dist.irecv(buf, group=group.pg, group_src=peer, tag=tag)
    return P2PRequest(work, buf, CommRecord("recv", group.name, _nbytes(buf), 0.0, LOG.tag, group.size), what,
                      timeout_s)
