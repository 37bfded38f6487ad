"""The plan IR: ops of one training step per rank class, and their dependencies as a networkx DiGraph.

Read docs/plan_ir.md first. Both interpreters read this: the executor runs `Plan.program(stage)` op for op, the
simulator costs every op and runs the graph.

Edges carry two numbers that describe *partial* dependencies, so overlap can be expressed at coarse granularity:
- `frac` (default 1.0): v may start once u has done this fraction of its work (1.0: after u ends; 0.0: after u
  starts; 0.3: DP bucket ready 30 % into the backward that produces it).
- `tail` (default 0.0): v cannot end earlier than u.end + tail·duration(v) (a pipelined consumer: a compute op
  fed layer by layer by a prefetching gather ends at least one layer's work after the gather ends).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

import networkx as nx

from .mesh import Mesh
from .schedules import Action

Stream = Literal["compute", "comm", "p2p"]


class OpKind(str, Enum):
    FORWARD = "forward"
    BACKWARD = "backward"
    RECOMPUTE = "recompute"
    TP_ALLREDUCE = "tp_allreduce"
    SP_ALLGATHER = "sp_allgather"
    SP_REDUCESCATTER = "sp_reducescatter"
    CP_KV_EXCHANGE = "cp_kv_exchange"
    PP_SEND_ACT = "pp_send_act"
    PP_RECV_ACT = "pp_recv_act"
    PP_SEND_GRAD = "pp_send_grad"
    PP_RECV_GRAD = "pp_recv_grad"
    DP_ALLREDUCE = "dp_allreduce"
    DP_REDUCESCATTER = "dp_reducescatter"
    ZERO_ALLGATHER = "zero_allgather"
    OPTIMIZER = "optimizer"

    @property
    def is_compute(self) -> bool:
        return self in COMPUTE_KINDS

    @property
    def dim(self) -> str | None:
        """The mesh dimension a communication op runs on."""
        return _DIM.get(self)


COMPUTE_KINDS = frozenset({OpKind.FORWARD, OpKind.BACKWARD, OpKind.RECOMPUTE, OpKind.OPTIMIZER})
_DIM = {OpKind.TP_ALLREDUCE: "tp", OpKind.SP_ALLGATHER: "tp", OpKind.SP_REDUCESCATTER: "tp",
        OpKind.CP_KV_EXCHANGE: "cp", OpKind.PP_SEND_ACT: "pp", OpKind.PP_RECV_ACT: "pp", OpKind.PP_SEND_GRAD: "pp",
        OpKind.PP_RECV_GRAD: "pp", OpKind.DP_ALLREDUCE: "dp", OpKind.DP_REDUCESCATTER: "dp",
        OpKind.ZERO_ALLGATHER: "dp"}


@dataclass(frozen=True, slots=True)
class Op:
    """One unit of work of one rank class. All quantities are per rank (one GPU of the class), for the whole op.

    For a collective standing for `count` identical calls, `msg_bytes` is the payload of one call (the tensor a
    rank contributes to an all-reduce; the *output* of an all-gather / *input* of a reduce-scatter, i.e. the full
    unsharded tensor) and `wire_bytes` the bytes this rank sends over all `count` calls under the ring algorithm."""
    id: int
    kind: OpKind
    stage: int
    rank_class: str
    order: int                       # index in its rank class's program
    stream: Stream
    chunk: int = 0                   # model chunk (virtual stage) on this stage
    microbatch: int = -1             # -1: not tied to a micro-batch (DP buckets, optimizer)
    layers: range = range(0)         # global layer indices the op covers
    flops: float = 0.0               # matmul + attention FLOPs (per rank)
    attn_flops: float = 0.0          # the attention-core part of `flops` (costed at attention efficiency)
    mem_bytes: float = 0.0           # HBM bytes moved by memory-bound work (norms, activations, optimizer)
    wire_bytes: float = 0.0          # bytes this rank sends
    msg_bytes: float = 0.0           # payload of one call
    group: str | None = None         # mesh dim: "tp" | "cp" | "pp" | "dp"
    group_size: int = 1
    count: int = 1                   # identical collectives this op stands for
    peer: int | None = None          # peer stage for PP send/recv
    bucket: int = -1                 # DP bucket index (reverse layer order), -1 otherwise
    # A TP collective run inside a GEMM (parallel.tp_comm_overlap; TransformerEngine userbuffers): how ("ring":
    # ring exchange, the GEMM works on the chunk it holds while the next one arrives; "pipeline": the GEMM in
    # `overlap_splits` chunks, each chunk's reduce-scatter beside the next chunk's GEMM; "bulk": beside an
    # independent GEMM), the FLOPs of the GEMMs it hides in (per rank, all `count` calls) and the chunks.
    # "" = not overlapped. The op stays in program order on its stream; the simulator charges its exposed part.
    overlap: str = ""
    overlap_flops: float = 0.0
    overlap_splits: int = 1

    @property
    def is_compute(self) -> bool:
        return self.kind.is_compute

    @property
    def label(self) -> str:
        mb = f" mb{self.microbatch}" if self.microbatch >= 0 else ""
        b = f" bucket{self.bucket}" if self.bucket >= 0 else ""
        return f"{self.kind.value} s{self.stage} c{self.chunk}{mb}{b}"


@dataclass
class Plan:
    """A compiled step: ops (indexed by id) and dependency edges (u, v) -> (frac, tail).

    `graph` is the same thing as a networkx DiGraph (nodes = op ids with attribute "op", edges with attributes
    frac and tail), built on first access: the simulator walks the plain lists, which is several times faster."""
    spec: object                                    # loom.spec.Spec (not imported: avoids a cycle)
    mesh: Mesh
    op_list: list[Op]                               # op i has id i
    edges: dict[tuple[int, int], tuple[float, float]]
    schedule: list[list[Action]]                    # per stage, from schedules.build_schedule
    stage_chunks: list[list[range]]                 # stage -> chunk -> global layer indices
    programs: dict[str, list[int]] = field(default_factory=dict)   # rank class -> op ids in program order
    _preds: list[list[tuple[int, float, float]]] | None = field(default=None, repr=False)
    _topo: list[int] | None = field(default=None, repr=False)
    _graph: nx.DiGraph | None = field(default=None, repr=False)

    @property
    def graph(self) -> nx.DiGraph:
        if self._graph is None:
            g = nx.DiGraph()
            g.add_nodes_from((op.id, {"op": op}) for op in self.op_list)
            g.add_edges_from((u, v, {"frac": f, "tail": t}) for (u, v), (f, t) in self.edges.items())
            self._graph = g
        return self._graph

    # ---- access ----------------------------------------------------------------------------------------------
    @property
    def stages(self) -> int:
        return len(self.schedule)

    @property
    def rank_classes(self) -> list[str]:
        return list(self.programs)

    def op(self, op_id: int) -> Op:
        return self.op_list[op_id]

    def ops(self) -> list[Op]:
        """All ops, indexed by id."""
        return self.op_list

    def program(self, stage: int) -> list[Op]:
        """What one rank of pipeline stage `stage` runs, in order (every stream interleaved as issued)."""
        return [self.op(i) for i in self.programs[class_name(stage)]]

    def rank_class_of(self, rank: int) -> str:
        return class_name(self.mesh.coords(rank)["pp"])

    def class_size(self, rank_class: str) -> int:
        """Ranks that run this class's program: every dp, cp and tp rank of one stage."""
        return self.mesh.world_size // self.mesh.size("pp")

    def deps(self, op_id: int) -> list[tuple[int, float, float]]:
        """(predecessor id, frac, tail) for each dependency of an op."""
        return self.preds()[op_id]

    def preds(self) -> list[list[tuple[int, float, float]]]:
        """Dependencies of every op, indexed by op id (ids are 0..n-1); cached, derived from the graph."""
        if self._preds is None:
            self._preds = [[] for _ in range(len(self))]
            for (u, v), (f, t) in self.edges.items():
                self._preds[v].append((u, f, t))
        return self._preds

    def topological_order(self) -> list[int]:
        """Op ids, every op after all of its dependencies (Kahn's algorithm); cached."""
        if self._topo is None:
            preds = self.preds()
            succ: list[list[int]] = [[] for _ in preds]
            indeg = [len(p) for p in preds]
            for v, p in enumerate(preds):
                for u, _, _ in p:
                    succ[u].append(v)
            ready = [v for v, d in enumerate(indeg) if d == 0]
            order: list[int] = []
            while ready:
                u = ready.pop()
                order.append(u)
                for v in succ[u]:
                    indeg[v] -= 1
                    if indeg[v] == 0:
                        ready.append(v)
            if len(order) != len(preds):
                raise ValueError("the plan graph has a cycle")
            self._topo = order
        return self._topo

    # ---- totals ----------------------------------------------------------------------------------------------
    def total_flops(self) -> float:
        """Compute FLOPs of one step summed over all ranks."""
        return sum(op.flops for op in self.op_list) * self.class_size("")   # every class has the same size

    def totals(self) -> dict:
        """Per rank class: FLOPs, HBM bytes and wire bytes by mesh dim, and op counts."""
        out: dict[str, dict] = {}
        for rc, ids in self.programs.items():
            t = {"ops": len(ids), "flops": 0.0, "mem_bytes": 0.0, "wire_bytes": {"tp": 0.0, "cp": 0.0, "pp": 0.0,
                                                                               "dp": 0.0}}
            for i in ids:
                op = self.op(i)
                t["flops"] += op.flops
                t["mem_bytes"] += op.mem_bytes
                if op.group:
                    t["wire_bytes"][op.group] += op.wire_bytes
            out[rc] = t
        return out

    def __len__(self) -> int:
        return len(self.op_list)


def class_name(stage: int) -> str:
    return f"stage{stage}"
