"""Pipeline parallelism: run one stage's program of the plan (F, B, SEND/RECV of activations and gradients).

The order of work is the plan's (`plan.program(stage)`, built by `loom.spec.schedules`): this module never derives
a schedule, it executes the list it is given and checks it as it goes. Point-to-point messages are non-blocking:
a RECV posts an irecv that the consuming F/B waits on; a SEND posts an isend that is waited on at the end of the
step. The plan guarantees a deadlock-free order (spec/schedules.py); if the executor and the plan disagree a wait
times out with a `P2PTimeout` naming the stage and the op (pp_p2p.py), and structural mistakes (B before F, an F
whose input was never received, a receive nobody consumed) raise `PipelineError` at once.

A stage is a list of `Chunk`s (one per virtual stage on this rank: vpp of them for the interleaved schedule).
`Chunk.run(x, mb)` maps the incoming activation (None on the first virtual stage, which reads its micro-batch
itself) to the outgoing activation, or on the last virtual stage to the micro-batch's loss, already scaled so that
the sum over micro-batches, stages' DP/CP replicas and steps is the single-process loss (mean over all tokens of
the global batch). `decoder_chunk` adapts `executor.model.Decoder` to this interface.

Ops of the program that are not pipeline work (DP reductions, optimizer, ZeRO gathers) are handed to `on_other`;
TP/SP/CP collectives and recompute happen inside F and B (the model issues them) and are skipped here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from . import comm
from .comm import Group
from .pp_p2p import DEFAULT_TIMEOUT_S, P2PRequest, irecv, isend

PP_KINDS = ("F", "B", "SEND_ACT", "RECV_ACT", "SEND_GRAD", "RECV_GRAD")
_OPKIND_TO_ACTION = {"forward": "F", "backward": "B", "pp_send_act": "SEND_ACT", "pp_recv_act": "RECV_ACT",
                     "pp_send_grad": "SEND_GRAD", "pp_recv_grad": "RECV_GRAD"}
_INSIDE_COMPUTE = ("recompute", "tp_allreduce", "sp_allgather", "sp_reducescatter", "cp_kv_exchange")


class PipelineError(RuntimeError):
    """The program handed to the runner is inconsistent with what the runner has seen so far."""


@dataclass(frozen=True)
class PPAction:
    kind: str           # one of PP_KINDS
    microbatch: int
    chunk: int = 0
    peer: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}.{self.chunk}"


def to_action(item: Any) -> PPAction | None:
    """A plan `Op` or a schedule `Action` as a PPAction; None for ops that are not pipeline work."""
    kind = getattr(item, "kind")
    kind = getattr(kind, "value", kind)
    kind = _OPKIND_TO_ACTION.get(kind, kind)
    if kind not in PP_KINDS:
        return None
    return PPAction(kind, item.microbatch, item.chunk, item.peer)


@dataclass
class Chunk:
    """One model chunk (virtual stage) on this rank; see the module docstring for `run`."""
    run: Callable[[torch.Tensor | None, int], torch.Tensor]
    first: bool                 # virtual stage 0: no incoming activation
    last: bool                  # last virtual stage: run returns the scaled loss


@dataclass
class StepResult:
    loss: float | None                          # sum of the scaled micro-batch losses (last stage), else None
    trace: list[str] = field(default_factory=list)          # executed pipeline actions, in order
    times: list[tuple[str, float, float]] = field(default_factory=list)   # (action, start_s, end_s) from t0_s
    t0_s: float = 0.0                           # time.perf_counter() at the step's start (CLOCK_MONOTONIC on Linux)


class PipelineRunner:
    """Executes one stage's program. `stage` and `pp` locate this rank; `vpp` chunks per stage.

    `act_shape`/`act_dtype`: the activation tensor passed between stages (receivers allocate it up front, as
    Megatron's p2p_communication does with its `tensor_shape`)."""

    def __init__(self, chunks: Sequence[Chunk], pp: Group, act_shape: tuple[int, ...], act_dtype: torch.dtype,
                 device: torch.device | str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S):
        self.chunks, self.pp = list(chunks), pp
        self.stage, self.p, self.v = pp.rank, pp.size, len(chunks)
        self.act_shape, self.act_dtype, self.device = tuple(act_shape), act_dtype, torch.device(device)
        self.timeout_s = timeout_s
        for c, ch in enumerate(self.chunks):
            j = c * self.p + self.stage
            if ch.first != (j == 0) or ch.last != (j == self.p * self.v - 1):
                raise PipelineError(f"stage {self.stage} chunk {c} is virtual stage {j} of {self.p * self.v}: "
                                    f"first={ch.first}, last={ch.last} do not match")

    # Tags: one per (direction kind, boundary between virtual stages j and j+1, micro-batch), identical on the
    # sending and the receiving side.
    def _boundary(self, a: PPAction) -> int:
        j = a.chunk * self.p + self.stage
        return j if a.kind in ("SEND_ACT", "RECV_GRAD") else j - 1

    def _tag(self, a: PPAction) -> int:
        # 31 bits (c10d passes tags as C int): 1 bit ACT|GRAD, 11 bits boundary, 19 bits micro-batch.
        if not 0 <= a.microbatch < 1 << 19 or self.p * self.v > 1 << 11:
            raise PipelineError(f"stage {self.stage}: {a}: micro-batch or virtual stage count too large for a "
                                "message tag (limits 2^19 micro-batches, 2^11 virtual stages)")
        return (int(a.kind.endswith("GRAD")) << 30) | (self._boundary(a) << 19) | a.microbatch

    def _peer(self, a: PPAction) -> int:
        j = a.chunk * self.p + self.stage
        other = j + 1 if a.kind in ("SEND_ACT", "RECV_GRAD") else j - 1
        if not 0 <= other < self.p * self.v:
            raise PipelineError(f"stage {self.stage}: {a} has no peer (virtual stage {j} is at the end of the model)")
        if a.peer is not None and a.peer != other % self.p:
            raise PipelineError(f"stage {self.stage}: {a} names peer stage {a.peer}, the layout says {other % self.p}")
        return other % self.p

    def _what(self, a: PPAction) -> str:
        return f"pp stage {self.stage}: {a.kind} micro-batch {a.microbatch} chunk {a.chunk} (peer stage {self._peer(a)})"

    def _checked(self, t: torch.Tensor, a: PPAction) -> torch.Tensor:
        """The receiver allocated act_shape/act_dtype: a different tensor is a layout bug, named here."""
        if tuple(t.shape) != self.act_shape or t.dtype != self.act_dtype:
            raise PipelineError(f"{self._what(a)}: tensor {tuple(t.shape)} {t.dtype} differs from the pipeline's "
                                f"activation {self.act_shape} {self.act_dtype}")
        return t

    def step(self, program: Iterable[Any], on_other: Callable[[Any], None] | None = None,
             before_backward: Callable[[PPAction, int, int], None] | None = None,
             after_backward: Callable[[PPAction], None] | None = None,
             on_op: Callable[[Any, float, float], None] | None = None) -> StepResult:
        """Run the program once. `on_other(op)` gets every op that is not pipeline work, in program order;
        `before_backward(action, k, n)` runs before each B: it is the k-th of the n backwards of its chunk in this
        program (DP wrappers arm their gradient reduction for the last one); `after_backward(action)` after it.
        `on_op(item, start_s, end_s)` (time.perf_counter()) once per program item when it is done; items run
        inside F/B (TP/SP/CP collectives, recompute) get zero length."""
        program = list(program)
        n_b: dict[int, int] = {}
        for item in program:
            a = to_action(item)
            if a is not None and a.kind == "B":
                n_b[a.chunk] = n_b.get(a.chunk, 0) + 1
        k_b: dict[int, int] = {}
        recv_act: dict[tuple[int, int], P2PRequest] = {}
        recv_grad: dict[tuple[int, int], P2PRequest] = {}
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        to_send_grad: dict[tuple[int, int], torch.Tensor] = {}
        sends: list[P2PRequest] = []
        done_f: set[tuple[int, int]] = set()
        done_b: set[tuple[int, int]] = set()
        res = StepResult(None)
        loss = torch.zeros((), dtype=torch.float64)
        t_base = res.t0_s = time.perf_counter()
        for item in program:
            a = to_action(item)
            if a is None:
                kind = getattr(getattr(item, "kind", None), "value", getattr(item, "kind", None))
                t0 = time.perf_counter()
                if on_other is not None and kind not in _INSIDE_COMPUTE:
                    comm.LOG.tag = str(kind)                # the Trainer's convention: the plan op's kind
                    on_other(item)
                if on_op is not None:
                    on_op(item, t0, time.perf_counter())
                continue
            key = (a.microbatch, a.chunk)
            if not 0 <= a.chunk < self.v:
                raise PipelineError(f"stage {self.stage}: {a} names chunk {a.chunk}, this stage has {self.v}")
            t0 = time.perf_counter()
            comm.LOG.tag = f"pp.{a}"
            if a.kind == "RECV_ACT":
                recv_act[key] = irecv(self.act_shape, self.act_dtype, self.device, self.pp, self._peer(a),
                                      self._tag(a), self._what(a), self.timeout_s)
            elif a.kind == "RECV_GRAD":
                recv_grad[key] = irecv(self.act_shape, self.act_dtype, self.device, self.pp, self._peer(a),
                                       self._tag(a), self._what(a), self.timeout_s)
            elif a.kind == "F":
                ch = self.chunks[a.chunk]
                x = None
                if not ch.first:
                    if key not in recv_act:
                        raise PipelineError(f"stage {self.stage}: {a} has no RECV_ACT before it")
                    x = recv_act.pop(key).wait().requires_grad_(torch.is_grad_enabled())
                    inputs[key] = x
                outputs[key] = ch.run(x, a.microbatch)
                if ch.last:
                    loss += outputs[key].detach().double()
                done_f.add(key)
            elif a.kind == "SEND_ACT":
                if key not in outputs or self.chunks[a.chunk].last:
                    raise PipelineError(f"stage {self.stage}: {a} before its forward (or on the last stage)")
                sends.append(isend(self._checked(outputs[key].detach(), a), self.pp, self._peer(a), self._tag(a),
                                   self._what(a), self.timeout_s))
            elif a.kind == "B":
                if key not in done_f or key in done_b:
                    raise PipelineError(f"stage {self.stage}: {a} without its forward, or twice")
                if before_backward is not None:
                    before_backward(a, k_b.get(a.chunk, 0), n_b[a.chunk])
                k_b[a.chunk] = k_b.get(a.chunk, 0) + 1
                ch, out = self.chunks[a.chunk], outputs.pop(key)
                if ch.last:
                    torch.autograd.backward(out)
                else:
                    if key not in recv_grad:
                        raise PipelineError(f"stage {self.stage}: {a} has no RECV_GRAD before it")
                    torch.autograd.backward(out, recv_grad.pop(key).wait())
                if not ch.first:
                    to_send_grad[key] = inputs.pop(key).grad
                if after_backward is not None:
                    after_backward(a)
                done_b.add(key)
            elif a.kind == "SEND_GRAD":
                if key not in to_send_grad:
                    raise PipelineError(f"stage {self.stage}: {a} before its backward (or on the first stage)")
                sends.append(isend(self._checked(to_send_grad.pop(key), a), self.pp, self._peer(a), self._tag(a),
                                   self._what(a), self.timeout_s))
            t1 = time.perf_counter()
            res.trace.append(str(a))
            res.times.append((str(a), t0 - t_base, t1 - t_base))
            if on_op is not None:
                on_op(item, t0, t1)
        comm.LOG.tag = ""
        for s in sends:
            s.wait()
        left = [f"RECV_ACT{k}" for k in recv_act] + [f"RECV_GRAD{k}" for k in recv_grad] + \
            [f"SEND_GRAD{k}" for k in to_send_grad]
        if left or done_f != done_b:
            raise PipelineError(f"stage {self.stage}: step ended with unconsumed {left} or forwards without "
                                f"backwards {sorted(done_f - done_b)}")
        if any(c.last for c in self.chunks):
            res.loss = float(loss)
        return res


def stage_program(plan: Any, stage: int) -> list[Any]:
    """The ops a rank of `stage` runs, in the plan's order (the compiled plan's program when it has one)."""
    return plan.program(stage) if hasattr(plan, "program") else list(plan[stage])


# ---- adapters to executor.model.Decoder ----------------------------------------------------------------------
def decoder_chunk(decoder: nn.Module, batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                  loss_scale: float) -> Chunk:
    """A Chunk running part 1's `Decoder` (embedding if first, layers, norm + head + loss if last).

    `batch(mb)` gives the micro-batch's (ids, targets), each (batch, seq_local); the loss is
    sum(token losses) * loss_scale, with loss_scale = 1 / (tokens in the global batch)."""

    def run(x: torch.Tensor | None, mb: int) -> torch.Tensor:
        ids, targets = batch(mb)
        h = decoder.embed_tokens(ids) if decoder.first else x
        h = decoder.run_layers(h)
        if decoder.last:
            return decoder.token_losses(h, targets).sum() * loss_scale
        return h

    return Chunk(run, decoder.first, decoder.last)


def tied_embedding_param(chunks_modules: Sequence[nn.Module]) -> nn.Parameter | None:
    """The parameter that must stay equal across the first and last stage when embeddings are tied: the input
    embedding on virtual stage 0, the LM head weight on the last (Megatron: `shared_embedding_or_output_weight`)."""
    for m in chunks_modules:
        if getattr(m, "first", False) and getattr(m, "last", False):
            return None                                  # the same module: already one parameter
        if getattr(m, "first", False) and hasattr(m, "embed"):
            return m.embed.weight
        if getattr(m, "last", False) and hasattr(m, "head_weight"):
            return m.head_weight
    return None


def sync_tied_embedding_grad(grad: torch.Tensor | None, group: Group) -> None:
    """Sum the tied embedding's gradient over {first stage, last stage} (Megatron-LM
    core/distributed/finalize_model_grads.py, `_allreduce_embedding_grads`): both copies then take the same update
    and stay equal. `grad` is this rank's accumulated gradient of `tied_embedding_param` (None: not on this rank)."""
    if grad is None or not group.active:
        return
    prev, comm.LOG.tag = comm.LOG.tag, "pp.tied_embedding_grad"
    comm.all_reduce(grad, group)
    comm.LOG.tag = prev


def embedding_group_ranks(mesh: Any) -> list[list[int]]:
    """For each (dp, cp, tp) coordinate, the global ranks of the first and last pipeline stage (a `loom.spec.mesh`
    Mesh), the groups over which `sync_tied_embedding_grad` runs. Every rank must create all of them."""
    out = []
    for g in mesh.groups("pp"):
        out.append([g[0], g[-1]] if len(g) > 1 else [g[0]])
    return out
