"""Per-op selective recompute (recompute = "op") in the executor (executor/sac.py) against no recompute and against
the memory model (simulator/activations.py op_layer_bytes).

- parity: one process, Llama-style and GPT-2-style (biases: aten.addmm) decoders, loss and every gradient equal to
  the no-recompute run's; under tp2, tp2+SP and dp2 ZeRO-3 (gloo), two Trainer steps give the no-recompute
  losses and gradient norms, and the TP/SP collectives and ZeRO-3 gathers the step issues are the plan's, call
  for call (the recompute reruns the TP collectives up to the checkpoint's early stop, as full recompute does);
- memory: what the layers keep alive between forward and backward, measured by liveness: every storage an op
  creates during the layers' forward (a TorchDispatchMode records a weak reference to it) that is still alive
  after the forward, parameters, buffers and the output excluded, plus the first layer's input. This sees the
  checkpoint's inputs and the selective-checkpoint cache, which saved_tensors_hooks (executor/measure.py) cannot:
  the cache holds its tensors directly. For no recompute the liveness count equals the saved_tensors_hooks count
  (checked: the method counts what measure.py counts). Per-op: equal to op_layer_bytes, on one process and on
  each tp2 (±SP) rank, to the byte.
"""
from __future__ import annotations

import time

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from loom.simulator.activations import layer_bytes, op_layer_bytes
from loom.spec import ModelSpec

LLAMA = dict(layers=3, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab=257, seq_len=32, rope_theta=10000.0)
GPT2 = dict(layers=3, hidden=64, heads=4, ffn_hidden=256, vocab=257, seq_len=32, bias=True, norm="layernorm",
            activation="gelu", position="learned")


class _Live(TorchDispatchMode):
    """Weak references to the storage of every op output while active."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.refs[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        return out


def kept_per_layer(dec, x0: torch.Tensor) -> float:
    """Bytes the decoder's layers keep for their backward, per layer (liveness, see the module docstring).
    Counted once the count is steady: on gloo ranks the last collective's C++ work object may hold its buffers
    for a few milliseconds after the call returned (released by gloo's worker thread, not by autograd)."""
    model_state = {t.untyped_storage().data_ptr() for t in list(dec.parameters()) + list(dec.buffers())}
    dec.run_layers(x0).sum().backward()                # warm-up: tables and caches the kernels build once
    live = _Live()
    with live:
        y = dec.run_layers(x0)
    skip = model_state | {y.untyped_storage().data_ptr(), x0.untyped_storage().data_ptr()}

    def alive() -> int:
        return sum(n for ptr, (ref, n) in live.refs.items() if not ref.expired() and ptr not in skip)
    count, steady = alive(), 0
    for _ in range(100):
        time.sleep(0.005)
        now = alive()
        steady, count = (steady + 1 if now == count else 0), now
        if steady == 3:
            break
    y.sum().backward()
    return (count + x0.untyped_storage().nbytes()) / len(dec.layers)


def _decoder(model: dict, recompute: str, **ctx):
    from loom.executor.model import BuildCtx, Decoder
    return Decoder(BuildCtx(ModelSpec(**model), recompute=recompute, seed=3, **ctx))


@pytest.mark.parametrize("model", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_op_recompute_gives_the_no_recompute_loss_and_gradients(model):
    torch.manual_seed(0)
    ids = torch.randint(0, model["vocab"], (2, model["seq_len"] + 1))
    out = {}
    for r in ("none", "op"):
        dec = _decoder(model, r)
        loss = dec.token_losses(dec(ids[:, :-1]), ids[:, 1:]).sum()
        loss.backward()
        out[r] = loss.detach(), {n: p.grad.clone() for n, p in dec.named_parameters()}
    assert torch.equal(out["op"][0], out["none"][0])
    for n, g in out["none"][1].items():
        torch.testing.assert_close(out["op"][1][n], g, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("model", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_kept_bytes_equal_the_memory_model(model):
    m, b = ModelSpec(**model), 2
    torch.manual_seed(0)
    x0 = torch.randn(m.seq_len, b, m.hidden, requires_grad=True)
    tokens = b * m.seq_len
    assert kept_per_layer(_decoder(model, "op"), x0) == op_layer_bytes(m, tokens, 4, 1, False)
    # the same method on the other checkpointed policy: full recompute keeps the layer input only
    assert kept_per_layer(_decoder(model, "full"), x0) == layer_bytes(m, tokens, 4, 1, False, "full")


def test_liveness_counts_what_saved_tensor_hooks_count():
    """Without a checkpoint every kept tensor is an autograd saved tensor: both methods must agree."""
    from loom.executor.measure import SavedTensors
    torch.manual_seed(0)
    dec = _decoder(LLAMA, "none")
    x0 = torch.randn(LLAMA["seq_len"], 2, LLAMA["hidden"], requires_grad=True)
    live = kept_per_layer(dec, x0)
    saved = SavedTensors(list(dec.parameters()) + list(dec.buffers()))
    saved.new_step()
    with saved.hooks():
        y = dec.run_layers(x0)
    assert live == saved.step["other"] / len(dec.layers)
    y.sum().backward()


# ---- tensor parallel and ZeRO-3, on gloo ranks ------------------------------------------------------------------
LAYOUTS = {"tp2": {"tp": 2}, "tp2_sp": {"tp": 2, "sp": True}, "dp2_zero3": {"dp": 2, "zero": 3}}


def _spec_dict(recompute: str, layout: str) -> dict:
    return {"model": dict(LLAMA, layers=2), "cluster": {"gpu": "cpu", "gpus_per_node": 2},
            "training": {"global_batch": 4, "micro_batch": 1 if "dp2" in layout else 2, "precision": "fp32",
                         "lr": 1e-3, "warmup_steps": 1, "recompute": recompute, "grad_clip": 1.0},
            "parallel": {**LAYOUTS[layout], "bucket_MB": 0.01}}


def _job(layout: str) -> dict:
    from loom.executor import comm
    from loom.executor.mesh import build_mesh
    from loom.executor.trainer import Trainer
    from loom.spec import spec_from_dict
    out: dict = {}
    for r in ("none", "op"):
        spec = spec_from_dict(_spec_dict(r, layout))
        tr = Trainer(spec, build_mesh(spec.plan, "cpu"), torch.device("cpu"), steps=2)
        stats, logs = [], []
        for _ in range(2):
            comm.LOG.clear()
            s = tr.step()
            stats.append((s.loss, s.grad_norm))
            logs.append([(c.kind, c.group, c.bytes, c.tag) for c in comm.LOG.records])
        out[r] = {"stats": stats, "comm": logs[-1]}
        if r == "op" and spec.plan.tp > 1:
            m = spec.model
            torch.manual_seed(0)
            x0 = torch.randn(m.seq_len // (2 if spec.plan.sp else 1), 2, m.hidden, requires_grad=True)
            out["kept"] = kept_per_layer(tr.model, x0)
    return out


@pytest.fixture(scope="module")
def pool_runs() -> dict:
    from tests.test_executor_pp_harness import RankPool
    pool = RankPool(2)
    try:
        return {name: pool.run(_job, name) for name in LAYOUTS}
    finally:
        pool.close()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_op_recompute_parity_comm_and_memory_on_ranks(pool_runs, layout):
    from collections import Counter

    from loom.spec import compile_plan, spec_from_dict
    from tests.test_plan_executor_agreement import EXACT, classify
    spec = spec_from_dict(_spec_dict("op", layout))
    plan = compile_plan(spec)
    exact = set(EXACT) | ({"zero_allgather"} if spec.plan.zero == 3 else set())
    want: Counter = Counter()
    for op in plan.program(0):
        if op.kind.value in exact:
            want[(op.kind.value, round(op.msg_bytes))] += op.count
    m, p = spec.model, spec.plan
    for rank in pool_runs[layout]:
        for (l_op, n_op), (l_none, n_none) in zip(rank["op"]["stats"], rank["none"]["stats"]):
            assert l_op == pytest.approx(l_none, rel=1e-6) and n_op == pytest.approx(n_none, rel=1e-6)
        got: Counter = Counter()
        for kind, group, nbytes, tag in rank["op"]["comm"]:
            k = classify(kind, group, nbytes, tag)
            if k in exact:
                got[(k, nbytes)] += 1
        assert got == want            # TP/SP collectives incl. the recompute's; ZeRO-3 gathers, call for call
        if p.tp > 1:
            # each rank keeps its TP share: Q, V, gate, attention out and LSE halved, the down projection's
            # partial sum whole, the input halved under SP only
            assert rank["kept"] == op_layer_bytes(m, 2 * m.seq_len, 4, tp=2, sp=p.sp)
