"""The measured step as a timeline: the executor's per-op records turned into the simulator's slices, and the
exposed communication per mesh dim computed from them by the simulator's definitions (loom.simulator.timing)."""
from __future__ import annotations

from loom.simulator.timing import merge_intervals as _merge


def _subtract(iv: list[tuple[float, float]], cut: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out = []
    for a, b in _merge(iv):
        pieces = [(a, b)]
        for x, y in _merge(cut):
            nxt = []
            for p, q in pieces:
                if y <= p or x >= q:
                    nxt.append((p, q))
                    continue
                if x > p:
                    nxt.append((p, x))
                if y < q:
                    nxt.append((y, q))
            pieces = nxt
        out += pieces
    return out


def _length(iv: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in _merge(iv))


_DIM_OF_GROUP = {"tp": "tp", "cp": "cp", "pp": "pp", "dp": "dp", "dp+cp": "dp", "emb": "pp"}
_SYNC = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")


def _blocking(rec: dict) -> bool:
    """A collective the calling thread waits in (comm.py's synchronous calls): every one but the DP gradient
    reductions, which dp.py issues asynchronously from the backward's hooks, and point-to-point messages."""
    return rec["kind"] in _SYNC and ">dp_allreduce" not in rec["tag"] and ">dp_reducescatter" not in rec["tag"]


def measured_slices(plan, step: dict):
    """Slices (loom.simulator.engine.Slice) of one rank's measured step, and each op's busy duration. A forward or
    backward that first waits for a pipeline receive is busy only from the receive's end (the wait is bubble)."""
    from loom.simulator.engine import Slice
    recv_end: dict[str, float] = {}
    for r in step["comm"]:
        if r["kind"] == "recv" and r["group"] == "pp":
            recv_end[r["tag"]] = r["end"]          # tag "pp.RECV_ACT<mb>.<chunk>" / "pp.RECV_GRAD<mb>.<chunk>"
    slices, busy = [], {}
    for op_id, a, b in step["ops"]:
        op = plan.op(int(op_id))
        start = a
        if op.kind.value in ("forward", "backward"):
            key = f"pp.RECV_{'ACT' if op.kind.value == 'forward' else 'GRAD'}{op.microbatch}.{op.chunk}"
            if key in recv_end:
                start = min(max(a, recv_end[key]), b)
        slices.append(Slice(op, a, b))
        busy[op.id] = b - start
    return slices, busy


def measured_exposed_comm(plan, step: dict) -> dict[str, float]:
    """Per mesh dim: time of this rank's communication not covered by its compute. Compute = forward, backward,
    recompute and optimizer intervals minus the blocking collectives issued inside them (TP/SP, the gradient
    norm, ZeRO gathers); communication = every recorded collective's interval (issue to end of wait) and the plan's own
    communication ops as timed units (DP waits, ZeRO gathers, PP send/recv posts)."""
    compute, comm_iv = [], {"tp": [], "cp": [], "pp": [], "dp": []}
    for op_id, a, b in step["ops"]:
        op = plan.op(int(op_id))
        if op.is_compute:
            compute.append((a, b))
        elif op.group in comm_iv:
            comm_iv[op.group].append((a, b))
    blocking = [(r["start"], r["end"]) for r in step["comm"] if _blocking(r)]
    busy = _subtract(compute, blocking)
    for r in step["comm"]:
        d = _DIM_OF_GROUP.get(r["group"])
        if d is None or r["kind"] == "recv":
            continue
        comm_iv[d].append((r["start"], r["end"]))
    return {d: _length(_subtract(iv, busy)) for d, iv in comm_iv.items()}


def _representatives(ranks: list[dict]) -> dict[int, dict]:
    """One rank per stage: the one at dp = cp = tp = 0."""
    out = {}
    for r in ranks:
        c = r["coords"]
        if c.get("dp", 0) == 0 and c.get("cp", 0) == 0 and c.get("tp", 0) == 0:
            out[r["stage"]] = r
    return out
