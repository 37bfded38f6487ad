"""The plan compiler's op and edge collector, `_Builder`: appends ops to their rank class's program, merges edges,
and emits collectives with their group size and the bytes each rank sends (`_ring`); `_stream_order` chains the
ops of one class on one stream. Knows nothing of what the ops mean.
Ring collective volumes per rank (Patarasuk & Yuan 2009; NCCL docs "Collective operations"/nccl-tests
PERFORMANCE.md): all-reduce 2(n-1)/n·B, all-gather and reduce-scatter (n-1)/n·B, with B the full tensor.
"""
from __future__ import annotations

from .compile_sizes import _Shapes
from .plan import Op, OpKind, class_name


def _ring(kind: OpKind, n: int, msg: float) -> float:
    """Bytes one rank sends in one ring collective over n ranks on a tensor of msg bytes."""
    if n <= 1:
        return 0.0
    if kind in (OpKind.TP_ALLREDUCE, OpKind.DP_ALLREDUCE):
        return 2.0 * (n - 1) / n * msg
    return (n - 1) / n * msg


class _Builder:
    """Collects ops and edges in plain lists and dicts."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.sh = _Shapes(spec)
        self.v = spec.plan.vpp if spec.plan.schedule == "interleaved" else 1     # model chunks per stage
        self.ops: list[Op] = []
        self.edges: dict[tuple[int, int], tuple[float, float]] = {}
        self.programs: dict[str, list[int]] = {}
        self.degree = {d: spec.plan.degree(d) for d in ("tp", "cp", "pp", "dp")}
        # DP/ZeRO collectives run over dp×cp: parameters are replicated over cp too (Megatron-LM's data-parallel
        # group with context parallelism; torchtitan's dp_shard×cp FSDP mesh). Their ops keep group "dp".
        self.degree["dp"] = spec.plan.dp * spec.plan.cp

    def add(self, stage: int, kind: OpKind, stream: str, **kw) -> int:
        rc = class_name(stage)
        prog = self.programs.setdefault(rc, [])
        if "group" in kw:
            kw["group_size"] = self.degree[kw["group"]]
        op = Op(id=len(self.ops), kind=kind, stage=stage, rank_class=rc, order=len(prog), stream=stream, **kw)
        self.ops.append(op)
        prog.append(op.id)
        return op.id

    def edge(self, u: int, v: int, frac: float = 1.0, tail: float = 0.0) -> None:
        d = self.edges.get((u, v))
        if d is None:
            self.edges[(u, v)] = (frac, tail)
        else:
            self.edges[(u, v)] = (max(d[0], frac), max(d[1], tail))

    def collective(self, stage: int, kind: OpKind, count: int, msg: float, **kw) -> int | None:
        dim = kind.dim
        n = self.degree[dim]
        if n <= 1 or count <= 0:
            return None
        wire = msg * count if kind == OpKind.CP_KV_EXCHANGE else _ring(kind, n, msg) * count
        stream = "compute" if dim == "tp" else "comm"
        return self.add(stage, kind, stream, msg_bytes=msg, wire_bytes=wire, count=count, group=dim, **kw)


def _stream_order(b: _Builder) -> None:
    """Ops of one rank class on one stream run in program order (one CUDA stream = one in-order queue)."""
    for ids in b.programs.values():
        last: dict[str, int] = {}
        for i in ids:
            st = b.ops[i].stream
            if st in last:
                b.edge(last[st], i)
            last[st] = i
