"""Pipeline schedules: per stage, the ordered list of actions (compute and point-to-point) of one training step.

Vocabulary. p stages, m micro-batches per step, v model chunks per stage (virtual stages). Chunk c of stage s holds
virtual stage j = c·p + s (Megatron-LM's interleaving: stage s owns layer blocks s, s+p, s+2p, ...). Activations flow
j -> j+1 (stage s -> s+1, and from the last stage back to stage 0 for the next chunk), gradients flow j+1 -> j.

Compute orders (F = forward, B = backward of one chunk for one micro-batch):
- "afab" (GPipe, Huang et al. 2019): all m forwards, then all m backwards.
- "1f1b" (PipeDream-Flush, Narayanan et al. 2021 §2.2.1): stage s runs min(p-s-1, m) warm-up forwards, then
  alternates one forward / one backward, then drains the remaining backwards.
- "interleaved" (Narayanan et al. 2021 §2.2.2; Megatron-LM core/pipeline_parallel/schedules.py,
  forward_backward_pipelining_with_interleaving): forwards are taken in groups of p micro-batches per chunk
  (k-th forward: chunk (k // p) % v, micro-batch (k // (p·v))·p + k % p); backwards likewise with chunks in reverse
  order. Warm-up is (p-s-1)·2 + (v-1)·p forwards (all of them when m == p), then 1F1B, then drain. Needs m % p == 0.

Communication. Each F on a virtual stage j > 0 is preceded by RECV_ACT from stage(j-1); each F on j < last is
followed by SEND_ACT to stage(j+1). Each B on j < last is preceded by RECV_GRAD from stage(j+1); each B on j > 0 is
followed by SEND_GRAD to stage(j-1). Semantics: sends are non-blocking (isend; the buffer is freed when it
completes), receives block until the data arrived. Under these semantics a schedule is deadlock-free iff the
graph "program order on every stage + send -> matching recv" is acyclic; because every stage's compute order is a
linear extension of the micro-batch dependencies (F_j(i) before F_{j+1}(i), B_{j+1}(i) before B_j(i)) and all
stages list forwards in the same (micro-batch, chunk) order (and backwards likewise), each directed channel
(src, dst, kind) carries messages in the order the receiver consumes them: FIFO matching works even without tags
(NCCL point-to-point matches in posting order). `validate_schedule` checks all of this by running the schedule.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

ActionKind = Literal["F", "B", "SEND_ACT", "RECV_ACT", "SEND_GRAD", "RECV_GRAD"]
SCHEDULES = ("afab", "1f1b", "interleaved")


class ScheduleError(ValueError):
    pass


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    microbatch: int
    chunk: int = 0
    peer: int | None = None     # peer stage for sends/recvs

    def __str__(self) -> str:
        peer = f"->{self.peer}" if self.kind.startswith("SEND") else f"<-{self.peer}" if self.peer is not None else ""
        return f"{self.kind}{self.microbatch}.{self.chunk}{peer}"


# ---- compute orders ------------------------------------------------------------------------------------------
def afab_order(p: int, m: int, stage: int) -> list[Action]:
    return [Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)]


def one_f_one_b_order(p: int, m: int, stage: int) -> list[Action]:
    warmup = min(p - stage - 1, m)
    out = [Action("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        out += [Action("F", warmup + i), Action("B", i)]
    out += [Action("B", i) for i in range(m - warmup, m)]
    return out


def _interleaved_id(k: int, p: int, v: int, forward: bool) -> tuple[int, int]:
    """(micro-batch, chunk) of the k-th forward (or backward) on any stage (Megatron's get_model_chunk_id)."""
    group = k % (p * v)
    chunk = group // p
    if not forward:
        chunk = v - 1 - chunk
    return (k // (p * v)) * p + k % p, chunk


def interleaved_order(p: int, m: int, stage: int, v: int) -> list[Action]:
    if m % p:
        raise ScheduleError(f"the interleaved schedule needs micro-batches ({m}) divisible by stages ({p})")
    total = m * v
    warmup = total if m == p else min((p - stage - 1) * 2 + (v - 1) * p, total)
    fwd = [Action("F", *_interleaved_id(k, p, v, True)) for k in range(total)]
    bwd = [Action("B", *_interleaved_id(k, p, v, False)) for k in range(total)]
    out = fwd[:warmup]
    for k in range(total - warmup):
        out += [fwd[warmup + k], bwd[k]]
    return out + bwd[total - warmup:]


def compute_order(kind: str, p: int, m: int, stage: int, v: int = 1) -> list[Action]:
    if kind == "afab":
        return afab_order(p, m, stage)
    if kind == "1f1b":
        return one_f_one_b_order(p, m, stage)
    if kind == "interleaved":
        return interleaved_order(p, m, stage, v)
    raise ScheduleError(f"unknown schedule {kind!r}; use one of {SCHEDULES}")


# ---- communication -------------------------------------------------------------------------------------------
def neighbours(stage: int, chunk: int, p: int, v: int) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(stage, chunk) of the previous and next virtual stage, None at the ends of the model."""
    j = chunk * p + stage
    prev = None if j == 0 else ((j - 1) % p, (j - 1) // p)
    nxt = None if j == p * v - 1 else ((j + 1) % p, (j + 1) // p)
    return prev, nxt


def with_p2p(order: list[Action], stage: int, p: int, v: int) -> list[Action]:
    """Insert the receives before and the sends after each compute action (see the module docstring)."""
    out: list[Action] = []
    for a in order:
        prev, nxt = neighbours(stage, a.chunk, p, v)
        if a.kind == "F":
            if prev:
                out.append(Action("RECV_ACT", a.microbatch, a.chunk, prev[0]))
            out.append(a)
            if nxt:
                out.append(Action("SEND_ACT", a.microbatch, a.chunk, nxt[0]))
        else:
            if nxt:
                out.append(Action("RECV_GRAD", a.microbatch, a.chunk, nxt[0]))
            out.append(a)
            if prev:
                out.append(Action("SEND_GRAD", a.microbatch, a.chunk, prev[0]))
    return out


def build_schedule(kind: str, p: int, m: int, v: int = 1) -> list[list[Action]]:
    """The per-stage action lists of one step (index = stage)."""
    if kind != "interleaved" and v != 1:
        raise ScheduleError(f"schedule {kind!r} takes one chunk per stage (vpp = 1), got vpp = {v}")
    if p < 1 or m < 1 or v < 1:
        raise ScheduleError(f"need p, m, v >= 1 (got p={p}, m={m}, v={v})")
    return [with_p2p(compute_order(kind, p, m, s, v), s, p, v) for s in range(p)]


# ---- validation ----------------------------------------------------------------------------------------------
def validate_schedule(sched: list[list[Action]], m: int, v: int = 1) -> list[tuple[int, Action]]:
    """Run the schedule with non-blocking sends and blocking FIFO receives per (src, dst, kind) channel.

    Raises ScheduleError if a stage misses or repeats work, runs B before its F, computes without its input,
    receives a message other than the one it expects (FIFO order mismatch), or deadlocks. Returns one global
    execution order [(stage, action)] (a witness)."""
    p = len(sched)
    for s, acts in enumerate(sched):
        for kind in ("F", "B"):
            got = sorted((a.microbatch, a.chunk) for a in acts if a.kind == kind)
            want = [(i, c) for i in range(m) for c in range(v)]
            if got != want:
                raise ScheduleError(f"stage {s}: {kind} actions {got} != every (micro-batch, chunk) once")
    channels: dict[tuple[int, int, str], deque] = {}
    have_act: list[set] = [set() for _ in range(p)]    # (mb, chunk) whose input activation arrived / was computed
    have_grad: list[set] = [set() for _ in range(p)]
    done_f: list[set] = [set() for _ in range(p)]
    pc = [0] * p
    trace: list[tuple[int, Action]] = []
    while any(pc[s] < len(sched[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while pc[s] < len(sched[s]):
                a = sched[s][pc[s]]
                key = (a.microbatch, a.chunk)
                prev, nxt = neighbours(s, a.chunk, p, v)
                if a.kind in ("SEND_ACT", "SEND_GRAD"):
                    kind = a.kind[5:]
                    need = done_f[s] if kind == "ACT" else None
                    if need is not None and key not in need:
                        raise ScheduleError(f"stage {s}: {a} before its forward")
                    dst = nxt if kind == "ACT" else prev
                    if dst is None or dst[0] != a.peer:
                        raise ScheduleError(f"stage {s}: {a} goes to the wrong peer")
                    channels.setdefault((s, a.peer, kind), deque()).append((a.microbatch, dst[1]))
                elif a.kind in ("RECV_ACT", "RECV_GRAD"):
                    kind = a.kind[5:]
                    q = channels.get((a.peer, s, kind))
                    if not q:
                        break                        # blocks until the sender posts
                    got = q.popleft()
                    if got != key:
                        raise ScheduleError(f"stage {s}: {a} matched message {got} (FIFO order differs)")
                    (have_act if kind == "ACT" else have_grad)[s].add(key)
                elif a.kind == "F":
                    if prev is not None and key not in have_act[s]:
                        raise ScheduleError(f"stage {s}: {a} runs before its input arrived")
                    done_f[s].add(key)
                else:
                    if key not in done_f[s]:
                        raise ScheduleError(f"stage {s}: {a} runs before F of the same micro-batch")
                    if nxt is not None and key not in have_grad[s]:
                        raise ScheduleError(f"stage {s}: {a} runs before its output gradient arrived")
                trace.append((s, a))
                pc[s] += 1
                progressed = True
        if not progressed:
            stuck = {s: str(sched[s][pc[s]]) for s in range(p) if pc[s] < len(sched[s])}
            raise ScheduleError(f"deadlock: stages wait at {stuck}")
    leftover = {k: list(q) for k, q in channels.items() if q}
    if leftover:
        raise ScheduleError(f"messages never received: {leftover}")
    return trace
