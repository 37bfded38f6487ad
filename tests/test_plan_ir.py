"""The plan IR: FLOP conservation, graph shape, mesh layout, DP/ZeRO/TP volumes against closed forms."""
from __future__ import annotations

import math

import networkx as nx
import pytest
from hypothesis import given, settings, strategies as st

from loom.spec import ClusterSpec, ModelSpec, ParallelSpec, Spec, TrainingSpec
from loom.spec.compile import compile_plan, split_layers
from loom.spec.mesh import Mesh
from loom.spec.plan import OpKind

SMALL = dict(layers=8, hidden=256, heads=8, kv_heads=4, ffn_hidden=512, vocab=1000, seq_len=128)


def make(gpn=8, nodes=1, global_batch=16, micro_batch=1, recompute="none", model=SMALL, **par) -> Spec:
    return Spec(model=ModelSpec(**model), cluster=ClusterSpec(gpus_per_node=gpn, nodes=nodes),
                training=TrainingSpec(global_batch=global_batch, micro_batch=micro_batch, recompute=recompute),
                parallel=ParallelSpec(**par))


@st.composite
def layouts(draw):
    """Valid small layouts: tp | kv_heads, pp·vpp | layers, cp | seq/2, batch divisible."""
    tp = draw(st.sampled_from([1, 2, 4]))
    pp = draw(st.sampled_from([1, 2, 4]))
    cp = draw(st.sampled_from([1, 2]))
    dp = draw(st.sampled_from([1, 2, 3]))
    sched = draw(st.sampled_from(["afab", "1f1b", "interleaved"])) if pp > 1 else "1f1b"
    vpp = 2 if sched == "interleaved" else 1
    m = draw(st.integers(1, 4)) * (pp if sched == "interleaved" else 1)
    mb = draw(st.sampled_from([1, 2]))
    return dict(tp=tp, pp=pp, cp=cp, dp=dp, schedule=sched, vpp=vpp, sp=tp > 1 and draw(st.booleans()),
                zero=draw(st.sampled_from([0, 1, 2, 3])), global_batch=m * dp * mb, micro_batch=mb,
                recompute=draw(st.sampled_from(["none", "selective", "full"])),
                gpn=draw(st.sampled_from([2, 4, 8])))


def spec_of(kw) -> Spec:
    kw = dict(kw)
    gpn = kw.pop("gpn")
    world = kw["tp"] * kw["pp"] * kw["cp"] * kw["dp"]
    gpn = min(gpn, world) if world % min(gpn, world) == 0 else 1
    return make(gpn=gpn, nodes=world // gpn, **kw)


@settings(max_examples=40, deadline=None)
@given(layouts())
def test_flops_conserved_and_graph_is_a_dag(kw):
    spec = spec_of(kw)
    plan = compile_plan(spec)
    want = spec.model.train_flops_per_token(spec.training.recompute) * spec.tokens_per_step
    assert plan.total_flops() == pytest.approx(want, rel=1e-9)
    assert nx.is_directed_acyclic_graph(plan.graph)
    for s in range(spec.plan.pp):                      # program order is stored consistently
        assert [op.order for op in plan.program(s)] == list(range(len(plan.program(s))))


def test_graph_size_independent_of_dp():
    sizes = {len(compile_plan(make(nodes=n, dp=n * 2, tp=2, pp=2, global_batch=8 * n * 2))) for n in (1, 4, 16)}
    assert len(sizes) == 1


def test_dp_allreduce_volume_is_closed_form():
    # ZeRO-0, no TP: every parameter's fp32 gradient crosses the ring once: 2(n-1)/n · 4 · N bytes per rank.
    spec = make(dp=8, global_batch=16)
    plan = compile_plan(spec)
    dp_ops = [o for o in plan.ops() if o.kind == OpKind.DP_ALLREDUCE]
    n = 8
    assert sum(o.wire_bytes for o in dp_ops) == pytest.approx(2 * (n - 1) / n * 4 * spec.model.param_count())
    assert sum(o.count for o in dp_ops) == math.ceil(4 * spec.model.param_count() / (25 * 2**20))


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_volumes_are_closed_form(zero):
    spec = make(dp=4, global_batch=8, zero=zero)        # 2 micro-batches per replica
    plan = compile_plan(spec)
    n, N = 4, spec.model.param_count()
    rs = sum(o.wire_bytes for o in plan.ops() if o.kind == OpKind.DP_REDUCESCATTER)
    ag = sum(o.wire_bytes for o in plan.ops() if o.kind == OpKind.ZERO_ALLGATHER)
    # fp32 grads reduce-scattered once per step (ZeRO-1) or after each of the 2 micro-batches (ZeRO-2/3).
    assert rs == pytest.approx((1 if zero == 1 else 2) * (n - 1) / n * 4 * N)
    # ZeRO-1/2: bf16 params gathered once after the step; ZeRO-3: every layer before every forward and backward
    # of every micro-batch (2 micro-batches × 2 passes), the root unit (embedding, final norm, head) once per
    # micro-batch (executor/dp.py keeps it from the forward to the backward).
    m = spec.model
    root = m.embedding_params() + m.head_params() + m.norm_params()
    gathered = N if zero < 3 else 2 * (2 * (N - root) + root)
    assert ag == pytest.approx((n - 1) / n * 2 * gathered)


def test_zero3_with_pp_gathers_once_per_chunk_and_reduces_once():
    """Under PP (torchtitan's FSDP+PP): each chunk, root included, is gathered once per step before its first
    forward, and its gradients reduce-scattered once, after its last backward."""
    spec = make(dp=2, pp=2, global_batch=8, zero=3)     # 4 micro-batches per replica
    plan = compile_plan(spec)
    m = spec.model
    for s in range(2):
        ops = plan.program(s)
        gathers = [o for o in ops if o.kind == OpKind.ZERO_ALLGATHER]
        assert {o.microbatch for o in gathers} == {0} and sum(o.count for o in gathers) == 4 + 1   # layers, root
        root = (m.embedding_params() if s == 0 else m.head_params() + m.norm_params()) * 2
        assert min(o.msg_bytes for o in gathers) == root
        rs = [o for o in ops if o.kind == OpKind.DP_REDUCESCATTER]
        assert {o.microbatch for o in rs} == {-1} and sum(o.wire_bytes for o in rs) > 0
        last_b = max(i for i, o in enumerate(ops) if o.kind == OpKind.BACKWARD)
        assert all(o.order > last_b for o in rs)


@pytest.mark.parametrize("sp", [False, True])
def test_tp_volume_is_closed_form(sp):
    spec = make(tp=4, sp=sp, global_batch=2)
    plan = compile_plan(spec)
    t, L, m = 4, SMALL["layers"], 2
    act = SMALL["seq_len"] * SMALL["hidden"] * 2          # b·s·h bf16 bytes
    kinds = (OpKind.SP_ALLGATHER, OpKind.SP_REDUCESCATTER, OpKind.TP_ALLREDUCE)
    ce = 3 * SMALL["seq_len"] * 4                        # cross-entropy: 3 all-reduces of one fp32 per token
    wire = sum(o.wire_bytes for o in plan.ops() if o.kind in kinds)
    # Megatron: 4 all-reduces per layer per micro-batch (2 fwd, 2 bwd) = 4·2(t-1)/t·act; with SP 4 AG + 4 RS of
    # (t-1)/t·act each: the same volume (Korthikanti et al. 2022 §4.2.2). Around the layers: the embedding's
    # reduction and the head input's backward one (SP: an AG + RS pair each), and the cross-entropy's. SP also
    # all-gathers the saved input shards of QKV, FC1 (per layer) and the LM head again in the backward (same §).
    regather = (2 * L + 1) * (t - 1) / t * act if sp else 0.0
    assert wire == pytest.approx(m * ((L * 4 + 2) * 2 * (t - 1) / t * act + regather + 2 * (t - 1) / t * ce))


def test_split_layers_llama3_405b():
    counts = [len(r) for r in split_layers(126, 16)]
    assert counts[0] == counts[-1] == 7 and set(counts[1:-1]) == {8} and sum(counts) == 126
    assert [len(r) for r in split_layers(8, 4)] == [2, 2, 2, 2]


def test_mesh_layout_matches_row_major():
    mesh = Mesh(("pp", "dp", "cp", "tp"), (2, 4, 1, 8), gpus_per_node=8)
    assert mesh.coords(13) == {"pp": 0, "dp": 1, "cp": 0, "tp": 5}
    assert mesh.rank(pp=1, dp=2, tp=3) == 1 * 32 + 2 * 8 + 3
    assert mesh.group("tp", 13) == list(range(8, 16))
    assert mesh.group("dp", 13) == [5, 13, 21, 29]
    assert not mesh.spans_nodes("tp") and mesh.spans_nodes("dp") and mesh.ranks_per_node("dp") == 1
    groups = mesh.groups("dp")
    assert sorted(r for g in groups for r in g) == list(range(64))
    # tp outermost: TP neighbours are 8 ranks apart, i.e. on different nodes.
    flipped = Mesh(("tp", "pp", "dp", "cp"), (8, 2, 4, 1), gpus_per_node=8)
    assert flipped.spans_nodes("tp") and flipped.nodes_spanned("tp") == 8


@settings(max_examples=30, deadline=None)
@given(st.permutations(["pp", "dp", "cp", "tp"]), st.lists(st.sampled_from([1, 2, 4]), min_size=4, max_size=4),
       st.sampled_from([1, 2, 4, 8]))
def test_mesh_groups_partition_ranks_and_representative_span(order, sizes, gpn):
    mesh = Mesh(tuple(order), tuple(sizes), gpus_per_node=gpn)
    for d in order:
        groups = mesh.groups(d)
        assert sorted(r for g in groups for r in g) == list(range(mesh.world_size))
        spans = {len({r // gpn for r in g}) for g in groups}
        assert spans == {mesh.nodes_spanned(d)}           # the group of rank 0 is representative
        for r in (0, mesh.world_size - 1):
            assert mesh.rank(**mesh.coords(r)) == r
