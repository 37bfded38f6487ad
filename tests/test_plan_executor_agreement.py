"""One IR, two interpreters: what the plan lists (spec/compile.py) is what the executor sends, op for op.

For each layout, every rank runs one training step through `Trainer` (gloo, fp32, tiny models) and returns its comm
log (executor/comm.py, pp_p2p.py) and the order in which it ran its compute. Most layouts use a Llama-style model
whose sizes divide every group; the padding and replication cases have their own layouts: a vocabulary tp does not
divide (padded to a multiple of tp), a GPT-2-style model (biases, LayerNorm, learned positions: replicated over tp)
under tp2, an odd hidden size whose DP units are padded to a multiple of dp, and tied embeddings under dp2×pp2
(the last stage's copy of the table). Against `plan.program(stage)` of the rank's stage:

- exact kinds (TP all-reduces incl. the embedding's, the LM head input's and the cross-entropy's; SP all-gathers and
  reduce-scatters; CP K/V and dK/dV sends; pipeline sends and receives; ZeRO-3 parameter gathers): the multiset of
  (plan kind, group, bytes of one call) -> calls equals the plan's Σ count per (kind, group, msg_bytes);
- gradient reductions (DP all-reduce / reduce-scatter) and the ZeRO-1/2 post-step gather: the number of calls
  equals the plan's Σ count and the bytes per step its Σ count·msg_bytes, exactly (the plan groups the executor's
  units, padded, into at most MAX_BUCKET_OPS ops whose msg_bytes is the group's mean);
- every executor collective maps to a plan kind, except the bookkeeping ones the plan does not list
  (spec/compile.py docstring): the loss report, the global-norm scalars, the SP-replicated gradients' all-reduce,
  the tied embedding's gradient sum over the first and last stage;
- the compute order: pipeline layouts compare the runner's executed actions with the plan's F/B/SEND/RECV ops;
  without PP, the ops the step reported through `Trainer.step(on_op=...)` are the program, in order.
"""
from __future__ import annotations

import copy
from collections import Counter

import pytest

MODEL = {"layers": 4, "hidden": 32, "heads": 4, "kv_heads": 2, "ffn_hidden": 64, "vocab": 258, "seq_len": 16,
         "rope_theta": 10000.0}


# GPT-2 style: biases, LayerNorm, GeLU, learned positions (replicated over tp); vocab 257 pads to 258 under tp2.
GPT2 = {"layers": 4, "hidden": 32, "heads": 4, "ffn_hidden": 128, "vocab": 257, "seq_len": 16, "bias": True,
        "norm": "layernorm", "activation": "gelu", "position": "learned"}
# Odd sizes (hidden 33, vocab 257): DP units of odd length, padded to a multiple of dp.
ODD = {**GPT2, "hidden": 33, "heads": 3, "ffn_hidden": 66}


def _spec(par: dict, micro_batch: int = 4, recompute: str = "none", model: dict | None = None,
          precision: str = "fp32") -> dict:
    par = {"bucket_MB": 0.01, **par}
    size = par.get("dp", 1) * par.get("tp", 1) * par.get("pp", 1) * par.get("cp", 1)
    return {"model": copy.deepcopy(model or MODEL), "cluster": {"gpu": "cpu", "gpus_per_node": size},
            "training": {"global_batch": 8, "micro_batch": micro_batch, "precision": precision, "lr": 1e-3,
                         "warmup_steps": 1, "recompute": recompute, "grad_clip": 1.0},
            "parallel": par}


LAYOUTS2 = {
    "dp2": _spec({"dp": 2}),
    "dp2_accum2": _spec({"dp": 2}, micro_batch=2),
    "dp2_zero1": _spec({"dp": 2, "zero": 1}),
    "dp2_zero2": _spec({"dp": 2, "zero": 2}, micro_batch=2),
    "dp2_zero3": _spec({"dp": 2, "zero": 3}, micro_batch=2),
    "tp2": _spec({"tp": 2}, micro_batch=4),
    "tp2_sp": _spec({"tp": 2, "sp": True}, micro_batch=4),
    "tp2_full": _spec({"tp": 2}, micro_batch=4, recompute="full"),
    "tp2_sp_full": _spec({"tp": 2, "sp": True}, micro_batch=4, recompute="full"),
    "pp2_1f1b": _spec({"pp": 2, "schedule": "1f1b"}, micro_batch=2),
    "pp2_interleaved": _spec({"pp": 2, "schedule": "interleaved", "vpp": 2}, micro_batch=2),
    "cp2": _spec({"cp": 2}, micro_batch=4),
    "dp2_zero1_odd": _spec({"dp": 2, "zero": 1}, micro_batch=2, model=ODD),
    "dp2_zero3_odd": _spec({"dp": 2, "zero": 3}, micro_batch=2, model=ODD),
    # bf16 (CPU autocast, the CUDA code path): TP/SP activations and their gradients, pipeline messages, CP K/V
    # and ZeRO parameter gathers in 2 bytes, as the plan counts them (executor/model.py amp_cast, dp.py)
    "bf16_dp2_zero1": _spec({"dp": 2, "zero": 1}, precision="bf16"),
    "bf16_dp2_zero3": _spec({"dp": 2, "zero": 3}, micro_batch=2, precision="bf16"),
    "bf16_tp2": _spec({"tp": 2}, precision="bf16"),
    "bf16_tp2_sp_full": _spec({"tp": 2, "sp": True}, recompute="full", precision="bf16"),
    "bf16_pp2_1f1b": _spec({"pp": 2, "schedule": "1f1b"}, micro_batch=2, precision="bf16"),
    "bf16_cp2": _spec({"cp": 2}, precision="bf16"),
}
LAYOUTS4 = {"dp2_tp2": _spec({"dp": 2, "tp": 2}, micro_batch=2),
            "dp2_pp2_zero1": _spec({"dp": 2, "pp": 2, "zero": 1}, micro_batch=2),
            "dp2_pp2_zero2": _spec({"dp": 2, "pp": 2, "zero": 2}, micro_batch=2),
            "dp2_pp2_zero3_interleaved": _spec({"dp": 2, "pp": 2, "zero": 3, "schedule": "interleaved", "vpp": 2},
                                               micro_batch=1),
            "dp2_cp2": _spec({"dp": 2, "cp": 2}, micro_batch=2),
            "dp2_tp2_sp_zero1_gpt2": _spec({"dp": 2, "tp": 2, "sp": True, "zero": 1}, micro_batch=2, model=GPT2),
            "dp2_tp2_zero3_gpt2": _spec({"dp": 2, "tp": 2, "zero": 3}, micro_batch=2, model=GPT2),
            "dp2_pp2_zero1_tied_interleaved": _spec({"dp": 2, "pp": 2, "zero": 1, "schedule": "interleaved",
                                                     "vpp": 2}, micro_batch=1,
                                                    model={**MODEL, "vocab": 257, "tied_embeddings": True}),
            "dp2_pp2_zero0_tied_odd": _spec({"dp": 2, "pp": 2, "schedule": "1f1b"}, micro_batch=2,
                                            model={**ODD, "tied_embeddings": True}),
            "bf16_dp2_tp2_sp_zero3_gpt2": _spec({"dp": 2, "tp": 2, "sp": True, "zero": 3}, micro_batch=2,
                                                model=GPT2, precision="bf16"),
            "bf16_dp2_pp2_zero2": _spec({"dp": 2, "pp": 2, "zero": 2}, micro_batch=2, precision="bf16"),
            # ZeRO-2 under PP reduces every micro-batch, except the chunk holding the tied table (once per step)
            "dp2_pp2_zero2_tied_interleaved": _spec({"dp": 2, "pp": 2, "zero": 2, "schedule": "interleaved",
                                                     "vpp": 2}, micro_batch=2,
                                                    model={**MODEL, "tied_embeddings": True})}

EXACT = ("tp_allreduce", "sp_allgather", "sp_reducescatter", "cp_kv_exchange", "pp_send_act", "pp_send_grad",
         "pp_recv_act", "pp_recv_grad")
BY_BYTES = ("dp_allreduce", "dp_reducescatter")


def _job(layouts: dict) -> dict:
    import torch

    from loom.executor import comm
    from loom.executor.mesh import build_mesh
    from loom.executor.trainer import Trainer
    from loom.spec import spec_from_dict

    out = {}
    for name, d in layouts.items():
        spec = spec_from_dict(d)
        tr = Trainer(spec, build_mesh(spec.plan, "cpu"), torch.device("cpu"), steps=2)
        ran: list[int] = []
        comm.LOG.clear()
        tr.step(on_op=lambda op, a, b: ran.append(op.id))
        out[name] = {"stage": tr.mesh["pp"].rank, "trace": list(tr.last_trace), "ran": ran,
                     "comm": [(r.kind, r.group, r.bytes, r.tag) for r in comm.LOG.records]}
    return out


@pytest.fixture(scope="module")
def measured() -> dict:
    from tests.test_executor_pp_harness import RankPool
    res: dict = {}
    for world, layouts in ((2, LAYOUTS2), (4, LAYOUTS4)):
        pool = RankPool(world)
        try:
            ranks = pool.run(_job, layouts)
        finally:
            pool.close()
        for name in layouts:
            res[name] = [r[name] for r in ranks]
    return res


IGNORED = "bookkeeping"


def classify(kind: str, group: str, nbytes: int, tag: str) -> str | None:
    """The plan kind of one executor record; None for the CP ring's receives (the plan's cp_kv_exchange counts
    the sends), IGNORED for the collectives the plan does not list."""
    for k in ("dp_allreduce", "dp_reducescatter", "zero_allgather"):   # first: with a tied copy under PP the
        if f">{k}" in tag:                                           # reduction runs inside the optimizer op
            return k
    if tag == "loss_report" or ">sp_grad_allreduce" in tag or (tag.startswith("optimizer") and kind == "all_reduce"):
        return IGNORED
    if group == "emb" and tag == "pp.tied_embedding_grad":      # tied copies' gradient sum, first + last stage
        return IGNORED
    if group == "cp":
        return "cp_kv_exchange" if kind == "send" else None
    if group == "pp":
        return {"send": "pp_send_", "recv": "pp_recv_"}[kind] + ("act" if "_ACT" in tag else "grad")
    if group == "tp":
        return {"all_reduce": "tp_allreduce", "all_gather": "sp_allgather", "reduce_scatter": "sp_reducescatter"}[kind]
    raise AssertionError(f"unclassified executor collective {kind} on {group} tagged {tag!r}")


def _plan(name: str):
    from loom.spec import spec_from_dict
    from loom.spec.compile import compile_plan
    d = (LAYOUTS2 | LAYOUTS4)[name]
    spec = spec_from_dict(d)
    return spec, compile_plan(spec)


@pytest.mark.parametrize("name", list(LAYOUTS2) + list(LAYOUTS4))
def test_executor_sends_what_the_plan_lists(measured, name):
    spec, plan = _plan(name)
    dp_group = "dp+cp" if spec.plan.cp > 1 or spec.plan.pp > 1 else "dp"     # pp_stage.Stage's group name
    zero_exact = spec.plan.zero == 3                   # ZeRO-3 gathers one call per layer / root, as the plan
    for rank, r in enumerate(measured[name]):
        want_calls: Counter = Counter()
        want_bytes: Counter = Counter()
        want_n: Counter = Counter()
        for op in plan.program(r["stage"]):
            if op.group is None:
                continue
            group = dp_group if op.group == "dp" else op.group
            k = op.kind.value
            if k in EXACT or (k == "zero_allgather" and zero_exact):
                want_calls[(k, group, round(op.msg_bytes))] += op.count
            else:
                want_bytes[(k, group)] += op.msg_bytes * op.count       # an op's msg_bytes: its units' mean
                want_n[(k, group)] += op.count
        got_calls: Counter = Counter()
        got_bytes: Counter = Counter()
        got_n: Counter = Counter()
        for kind, group, nbytes, tag in r["comm"]:
            k = classify(kind, group, nbytes, tag)
            if k is None or k == IGNORED:
                continue
            if k in EXACT or (k == "zero_allgather" and zero_exact):
                got_calls[(k, group, nbytes)] += 1
            else:
                got_bytes[(k, group)] += nbytes
                got_n[(k, group)] += 1
        assert got_calls == want_calls, f"rank {rank} (stage {r['stage']}): executor {dict(got_calls)} vs plan " \
                                        f"{dict(want_calls)}"
        want_bytes = Counter({k: round(v) for k, v in want_bytes.items()})
        assert got_bytes == want_bytes, f"rank {rank}: executor {dict(got_bytes)} vs plan {dict(want_bytes)}"
        assert got_n == want_n, f"rank {rank}: executor calls {dict(got_n)} vs plan {dict(want_n)}"


@pytest.mark.parametrize("name", list(LAYOUTS2) + list(LAYOUTS4))
def test_executor_runs_the_plan_program_in_order(measured, name):
    from loom.executor.pipeline import to_action
    spec, plan = _plan(name)
    for r in measured[name]:
        program = plan.program(r["stage"])
        assert r["ran"] == [op.id for op in program]     # on_op saw every op once, in program order
        if r["trace"] or spec.plan.pp > 1 or spec.plan.cp > 1:
            assert r["trace"] == [str(a) for a in map(to_action, program) if a is not None]


def test_the_comparison_can_fail(measured):
    """A plan that forgot one cross-entropy all-reduce would not pass: the tp2 log holds exactly 3 calls of
    one fp32 per token of each micro-batch (the vocab-parallel loss), which the plan must list."""
    spec, _ = _plan("tp2")
    ce = spec.training.micro_batch * spec.model.seq_len * 4
    log = measured["tp2"][0]["comm"]
    calls = [x for x in log if x[0] == "all_reduce" and x[1] == "tp" and x[2] == ce]
    assert len(calls) == 3 * spec.micro_batches


@pytest.mark.parametrize("name,padded", [("dp2_zero1_odd", True), ("dp2_tp2_sp_zero1_gpt2", False),
                                         ("dp2_pp2_zero1_tied_interleaved", False)])
def test_the_padding_layouts_send_every_parameter(measured, name, padded):
    """An independent count: simulator/memory.py's closed-form parameters per rank (replicated norms, row-parallel
    biases and position table; vocabulary padded to a multiple of tp; the tied copy on the last stage) times fp32
    gradient bytes is what each stage reduce-scatters, plus, for the odd sizes, the padding of its units to a
    multiple of dp (under 2 elements per unit) - which a plan counting unpadded or tp-divided parameters misses."""
    from loom.simulator.memory import stage_params_per_gpu
    spec, plan = _plan(name)
    p = spec.plan
    for r in measured[name]:
        got = sum(nbytes for kind, group, nbytes, tag in r["comm"] if ">dp_reducescatter" in tag)
        params = stage_params_per_gpu(spec.model, p.pp, p.tp, r["stage"], p.vpp if p.schedule == "interleaved" else 1)
        n_calls = sum(1 for *_, tag in r["comm"] if ">dp_reducescatter" in tag)
        if padded:
            assert 4 * params < got <= 4 * (params + n_calls)
        else:
            assert got == 4 * params
