"""DataParallel's two ZeRO-2/3 reduction rules give the same gradients and send what the plan says for each.

`every_micro_batch=True` (the plan without PP): reduce-scatter after every micro-batch, ZeRO-3 re-gathers each layer
around every forward and backward. `every_micro_batch=False` (the plan's rule under PP, spec/compile.py): full
gradients accumulate and are reduce-scattered once, after the last micro-batch; ZeRO-3 gathers each unit once, at
its first forward, and keeps it until that reduction. Two gloo ranks (dp2), 2 micro-batches, a 2-layer Decoder.
"""
from __future__ import annotations

import pytest


def _job(zero: int, every: bool) -> dict:
    import torch

    from loom.executor import comm
    from loom.executor.dp import DataParallel
    from loom.executor.mesh import build_mesh
    from loom.executor.model import BuildCtx, Decoder
    from loom.spec import ModelSpec
    from loom.spec.spec import ParallelSpec

    m = ModelSpec(layers=2, hidden=32, heads=4, kv_heads=2, ffn_hidden=64, vocab=64, seq_len=8)
    mesh = build_mesh(ParallelSpec(dp=2), "cpu")
    model = Decoder(BuildCtx(m, mesh.tp, False, "none", 0, torch.device("cpu")))
    dp = DataParallel(model, mesh.dp, mesh.tp, zero, 0.01, layer_units=list(model.layers), every_micro_batch=every)
    g = torch.Generator().manual_seed(1 + mesh.dp.rank)
    comm.LOG.clear()
    for mb in range(2):
        ids = torch.randint(0, 64, (2, 8), generator=g)
        comm.LOG.tag = "forward"
        if zero == 3:
            dp.gather_root()
        loss = model.loss_sum(model(ids), ids.roll(1, 1)) / 32
        comm.LOG.tag = "backward"
        dp.start_micro_batch(mb, 2)
        loss.backward()
        dp.finish_backward()
    storage = [(u.flat.untyped_storage().size(), u.grad.untyped_storage().size()) for u in dp.units]
    return {"grads": [x.clone() for x in dp.grad_shards()], "storage": storage,
            "comm": [(r.kind, r.tag.split(">")[0], r.bytes) for r in comm.LOG.records],
            "units": [u.numel for u in dp.units]}


@pytest.fixture(scope="module")
def runs() -> dict:
    from tests.test_executor_pp_harness import RankPool
    pool = RankPool(2)
    try:
        return {(z, e): pool.run(_job, z, e) for z in (2, 3) for e in (True, False)}
    finally:
        pool.close()


@pytest.mark.parametrize("zero", [2, 3])
def test_once_per_step_equals_every_micro_batch(runs, zero):
    import torch
    for a, b in zip(runs[(zero, True)], runs[(zero, False)]):
        for x, y in zip(a["grads"], b["grads"]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("zero", [2, 3])
def test_each_rule_sends_what_the_plan_says(runs, zero):
    units = runs[(zero, True)][0]["units"]
    total = 4 * sum(units)                                   # fp32 gradient / parameter bytes of every unit
    for every, reduces in ((True, 2), (False, 1)):
        log = runs[(zero, every)][0]["comm"]
        assert sum(b for k, _, b in log if k == "reduce_scatter") == reduces * total
        gathers = sum(b for k, _, b in log if k == "all_gather")
        if zero == 2:
            assert gathers == 0
        else:
            root = 4 * units[-1]
            # per micro-batch: every layer before its forward and its backward, the root once; per step: once
            assert gathers == (2 * (2 * (total - root) + root) if every else total)
        # between steps nothing full is kept: the same memory promise in both rules
        assert all(g == 0 for _, g in runs[(zero, every)][0]["storage"])
        if zero == 3:
            assert all(p == 0 for p, _ in runs[(zero, every)][0]["storage"])
