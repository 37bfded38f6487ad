"""compile_plan(spec) -> Plan: expand the schedule of every pipeline stage into ops with FLOPs, bytes and edges.

This file walks each stage's schedule (spec/schedules.py) and emits the pipeline's sends and receives; the rest
lives beside it, one concern per file:
- compile_sizes.py: byte widths and the per-rank sizes of one micro-batch (`_Shapes`);
- compile_builder.py: the op/edge collector (`_Builder`), ring wire bytes (`_ring`), stream order;
- compile_compute.py: a compute action's FORWARD/RECOMPUTE/BACKWARD ops, their FLOPs and bytes, CP exchanges;
- compile_tp.py: the TP/SP collectives of each compute op, with the `tp_comm_overlap` split;
- compile_dp.py: DP buckets, ZeRO gathers (`overlap_param_gather` included) and the optimizer step.
The public names (compile_plan, split_layers, per_micro_batch_reduction, the byte tables, and `_Shapes`, `_ring`,
MAX_BUCKET_OPS for simulator/fast_cost.py) stay importable from here.

Pipeline messages (b micro-batch, s seq_len, c = cp, t = tp, h hidden):
- PP: one activation (or its gradient) of b·(s/c)·h elements per send, /t with sequence parallel
  (Megatron scatters the pipeline message over the TP group when SP is on).
Not listed (bookkeeping, tests/test_plan_executor_agreement.py names them): the global-norm scalars, the logged
loss, the SP-replicated parameters' gradient all-reduce over tp and, with tied embeddings under PP, the tied
gradient's sum over the first and last stage.
"""
from __future__ import annotations

from .compile_builder import _Builder, _ring, _stream_order  # noqa: F401  (_ring: re-exported)
from .compile_compute import ChunkStep, compute_action
from .compile_dp import (MAX_BUCKET_OPS, _optimizer, gradient_reduction, param_gather, per_micro_batch_reduction,
                         zero3_gathers)
from .compile_sizes import ACT_BYTES, FP32_BYTES, GRAD_BYTES, OPT_STATE_BYTES, PARAM_BYTES
from .compile_sizes import _Shapes  # noqa: F401  (re-exported, with _ring, for simulator/fast_cost.py)
from .mesh import Mesh
from .plan import OpKind, Plan
from .schedules import build_schedule
from .units import split_layers

__all__ = ["compile_plan", "split_layers", "per_micro_batch_reduction", "ACT_BYTES", "PARAM_BYTES", "GRAD_BYTES",
           "OPT_STATE_BYTES", "FP32_BYTES", "MAX_BUCKET_OPS"]


def compile_plan(spec) -> Plan:
    par, train = spec.plan, spec.training
    pp, m = par.pp, spec.micro_batches
    v = par.vpp if par.schedule == "interleaved" else 1
    if m < 1:
        raise ValueError(f"global_batch {train.global_batch} gives no micro-batch per replica "
                         f"(dp·micro_batch = {par.dp * train.micro_batch})")
    mesh = Mesh.from_spec(spec)
    sched = build_schedule(par.schedule, pp, m, v)
    vstages = split_layers(spec.model.layers, pp * v)
    stage_chunks = [[vstages[c * pp + s] for c in range(v)] for s in range(pp)]
    b = _Builder(spec)
    sh = b.sh
    last_v = pp * v - 1

    tails: dict[tuple[str, int, int, int], int] = {}       # (F|B, stage, chunk, mb) -> op whose end = output ready
    sends: dict[tuple[str, int, int], int] = {}            # (ACT|GRAD, mb, receiving virtual stage) -> send op
    recvs: list[tuple[int, str, int, int]] = []            # (recv op, ACT|GRAD, mb, this virtual stage)
    dp_ops: dict[int, list[int]] = {}
    main_compute: dict[int, list[int]] = {}                # stage -> FORWARD/BACKWARD ids, for ZeRO-3 prefetch

    for s in range(pp):
        last_b = {c: max(i for i, a in enumerate(sched[s]) if a.kind == "B" and a.chunk == c) for c in range(v)}
        first_f = {c: min(i for i, a in enumerate(sched[s]) if a.kind == "F" and a.chunk == c) for c in range(v)}
        pending_recv: int | None = None
        for idx, a in enumerate(sched[s]):
            c, mb = a.chunk, a.microbatch
            j = c * pp + s
            layers = stage_chunks[s][c]
            first, last = j == 0, j == last_v
            pp_msg = sh.act_msg / (sh.tp if par.sp else 1)
            common = dict(chunk=c, microbatch=mb, layers=layers)
            if a.kind in ("RECV_ACT", "RECV_GRAD"):
                kind = OpKind.PP_RECV_ACT if a.kind == "RECV_ACT" else OpKind.PP_RECV_GRAD
                pending_recv = b.add(s, kind, "p2p", msg_bytes=pp_msg, group="pp", peer=a.peer, **common)
                recvs.append((pending_recv, a.kind[5:], mb, j))
                continue
            if a.kind in ("SEND_ACT", "SEND_GRAD"):
                kind = OpKind.PP_SEND_ACT if a.kind == "SEND_ACT" else OpKind.PP_SEND_GRAD
                op = b.add(s, kind, "p2p", msg_bytes=pp_msg, wire_bytes=pp_msg, group="pp", peer=a.peer, **common)
                b.edge(tails[("F" if a.kind == "SEND_ACT" else "B", s, c, mb)], op)
                dst = j + 1 if a.kind == "SEND_ACT" else j - 1
                sends[(a.kind[5:], mb, dst)] = op
                continue
            # ---- a compute action: F or B of (chunk, mb) ----
            before = [pending_recv] if pending_recv is not None else []
            pending_recv = None
            if a.kind == "B":
                before.append(tails[("F", s, c, mb)])
            st = ChunkStep(stage=s, chunk=c, microbatch=mb, layers=layers, first=first, last=last,
                           forward=a.kind == "F", first_forward=a.kind == "F" and idx == first_f[c], before=before)
            st.root, st.zero3 = zero3_gathers(b, st, main_compute[s][-1] if main_compute.get(s) else None)
            st.pgather = param_gather(b, st)
            main = compute_action(b, st)
            tails[(a.kind, s, c, mb)] = st.chain[-1]
            if a.kind == "B":
                reduction = gradient_reduction(b, st, main, idx == last_b[c])
                if reduction is not None:
                    dp_ops.setdefault(s, []).extend(reduction)
            main_compute.setdefault(s, []).append(main)

    for op, kind, mb, j in recvs:                                  # cross-stage edges: send -> matching recv
        b.edge(sends[(kind, mb, j)], op)
    _optimizer(b, pp, dp_ops, stage_chunks, last_v, v)
    _stream_order(b)
    return Plan(spec=spec, mesh=mesh, op_list=b.ops, edges=b.edges, schedule=sched, stage_chunks=stage_chunks,
                programs=b.programs)
