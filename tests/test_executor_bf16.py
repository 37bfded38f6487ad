"""The executor in bf16 (CPU autocast: the code path CUDA runs) and the ZeRO-3 prefetch, on gloo ranks.

- Layout (Megatron-LM's, the memory model's): bf16 module parameters and residual stream, fp32 masters in the
  optimizer, gradients accumulated into grad_dtype buffers (executor/dp.py). The linears then read the parameters
  themselves: autocast keeps no bf16 weight copy for the backward (checked below); the state bytes per ZeRO stage are
  in tests/test_executor_zero_grad_memory.py, verify's rows in tests/test_verify.py.
- bf16 layouts train like the bf16 single process within a tolerance derived below, and like fp32 within a looser
  one (tolerances derived below). (The plan's bytes are checked byte for byte in tests/test_plan_executor_agreement.py's bf16 layouts.)
- ZeRO-3 prefetch: the gather of layer i+1 (forward) or i-1 (backward) is issued before layer i finishes, the
  results equal those without prefetch bit for bit, and the number of gathers is unchanged.
- Init: no full-size tensor of a sharded parameter while a TP rank builds its part of the model.
"""
from __future__ import annotations

import copy

import pytest
import torch

LLAMA = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "ffn_hidden": 64, "vocab": 257, "seq_len": 16,
         "rope_theta": 10000.0}
STEPS = 3


def _spec(par: dict, micro_batch: int = 4, precision: str = "bf16", model: dict | None = None,
          recompute: str = "none") -> dict:
    par = {"bucket_MB": 0.01, **par}
    size = par.get("dp", 1) * par.get("tp", 1) * par.get("pp", 1) * par.get("cp", 1)
    return {"model": copy.deepcopy(model or LLAMA), "cluster": {"gpu": "cpu", "gpus_per_node": size},
            "training": {"global_batch": 8, "micro_batch": micro_batch, "precision": precision, "lr": 3e-3,
                         "warmup_steps": 1, "recompute": recompute, "grad_clip": 1.0, "weight_decay": 0.1},
            "parallel": par}


LAYOUTS = {
    "dp2": _spec({"dp": 2}),
    "dp2_zero1": _spec({"dp": 2, "zero": 1}),
    "dp2_zero3": _spec({"dp": 2, "zero": 3}, micro_batch=2),
    "tp2_sp": _spec({"tp": 2, "sp": True}, micro_batch=8),
    "dp2_tp2_zero2": _spec({"dp": 2, "tp": 2, "zero": 2}, micro_batch=2),
    "dp2_pp2_zero1": _spec({"dp": 2, "pp": 2, "zero": 1, "schedule": "1f1b"}, micro_batch=2),   # 4 ranks: no replicas
}
WORLD = 4


def _train(d: dict, steps: int, prefetch: bool = True):
    from loom.executor.mesh import build_mesh
    from loom.executor.trainer import Trainer
    from loom.spec import spec_from_dict
    import torch.distributed as dist

    spec = spec_from_dict(d)
    world = dist.get_world_size() if dist.is_initialized() else 1
    tr = Trainer(spec, build_mesh(spec.plan, "cpu", replicas=world // spec.plan.size), torch.device("cpu"), steps)
    for dp in (tr.stage.dps if tr.stage is not None else [tr.dp]):
        dp.prefetch = prefetch
    stats = [tr.step() for _ in range(steps)]
    return tr, [s.loss for s in stats], [s.grad_norm for s in stats]


def _job(layouts: dict, ckpt_dir: str) -> dict:
    from pathlib import Path

    from loom.executor.parity import run_case
    out = {}
    for name, d in layouts.items():
        tr, losses, norms = _train(d, STEPS)
        out[name] = {"losses": losses, "norms": norms, "params": tr.full_state()}
    # checkpoint resume under bf16 ZeRO-1 (fp32 master shard apart from the rounded parameter buffer)
    case = {"name": "resume", "spec": _spec({"dp": 2, "zero": 1}), "steps": 4}
    out["straight"] = run_case(case, Path(ckpt_dir))["losses"].tolist()
    out["resumed"] = run_case({**case, "resume_at": 2, "ckpt_dir": ckpt_dir}, Path(ckpt_dir))["losses"].tolist()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    from tests.test_executor_pp_harness import RankPool
    pool = RankPool(WORLD)
    try:
        ranks = pool.run(_job, LAYOUTS, str(tmp_path_factory.mktemp("ckpt")))
        trace = pool.run(_prefetch_job)
    finally:
        pool.close()
    refs = {}
    for prec in ("bf16", "fp32"):
        tr, losses, norms = _train(_spec({}, micro_batch=8, precision=prec), STEPS)
        refs[prec] = {"losses": losses, "norms": norms, "params": tr.full_state()}
    return {"ranks": ranks, "refs": refs, "trace": trace}


def _worst_param(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


# Tolerances. bf16 keeps 8 significant bits: rounding an operand errs by up to u = 2^-8 = 3.9e-3 relative (products
# accumulate in fp32). Every layout computes with the same bf16 parameters and bf16 residual stream (dp.py, model.py);
# a layout differs from the single process by a few roundings placed elsewhere (a TP partial sum rounded before
# its reduction, a residual add or a gradient summed in another order).
# - Gradient norm: every gradient element carries errors of order u, so the norm's relative error is of order u,
#   not less (measured <= 2.0e-3 vs the bf16 single process, 2026-11-28 with the Megatron layout): bound 5e-3.
# - Loss: the mean over 128 tokens of per-token errors that are independent across tokens, so well under u
#   (measured <= 1.8e-5 vs bf16, <= 1.6e-4 vs fp32; bf16 vs fp32 single process 1.4e-4): bounds 5e-4 and 1e-3,
#   still 40x below one step's improvement (~2e-2), so a dropped or doubled gradient shard fails.
# - Parameters, per tensor ||a - b|| / ||b|| after 3 AdamW steps: Adam's m/sqrt(v) turns an element whose gradient
#   is near zero into a +-lr step whichever its rounding, so bf16 noise shows at lr scale (measured <= 2.7e-2; the
#   fp32 single process is 3.3e-2 from the bf16 one): bound 5e-2, against a training change of ~0.45 per tensor.
BF16_LOSS, BF16_NORM, BF16_PARAM, FP32_LOSS = 5e-4, 5e-3, 5e-2, 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_bf16_layouts_train_like_the_bf16_single_process(results, name):
    got = results["ranks"][0][name]
    ref = results["refs"]["bf16"]
    loss = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"]))
    norm = max(abs(a - b) / abs(b) for a, b in zip(got["norms"], ref["norms"]))
    assert loss < BF16_LOSS and norm < BF16_NORM, (loss, norm)
    assert _worst_param(got["params"], ref["params"]) < BF16_PARAM
    fp32 = results["refs"]["fp32"]
    assert max(abs(a - b) / abs(b) for a, b in zip(got["losses"], fp32["losses"])) < FP32_LOSS
    for r in results["ranks"][1:]:                       # every rank reports the same losses
        assert r[name]["losses"] == got["losses"]


@pytest.mark.slow
def test_bf16_zero1_resumes_bit_identically(results):
    """The checkpoint holds the fp32 master shards; loading regathers the rounded parameters, so steps 3-4 after a
    resume at step 2 equal those of the straight run bit for bit."""
    r = results["ranks"][0]
    assert len(r["straight"]) == 4 and r["resumed"] == r["straight"]


@pytest.mark.slow
def test_bf16_is_not_fp32(results):
    """The bf16 runs really ran in bf16 (autocast on CPU): they differ from fp32 by more than fp32 layouts do."""
    a, b = results["refs"]["bf16"]["losses"], results["refs"]["fp32"]["losses"]
    assert max(abs(x - y) / abs(y) for x, y in zip(a, b)) > 1e-5


# ---- what a bf16 layer keeps for backward ---------------------------------------------------------------------
def test_bf16_layer_saves_no_weight_copies_and_no_fp32_residual():
    """One process, bf16 parameters (as dp.py makes them) under autocast: a layer's saved tensors are exactly the
    memory model's with the executor's kernels (verify_predict.EXECUTOR_ACTIVATIONS), at 2 bytes per activation
    element. The AMP layout this replaced (fp32 parameters, fp32 residual) saved 2 bytes per matmul parameter of
    autocast weight copies and the two norm inputs in fp32 on top (docs/verify.md)."""
    from loom.executor.model import BuildCtx, Decoder
    from loom.simulator.activations import layer_bytes
    from loom.spec import ModelSpec
    from loom.verify_predict import EXECUTOR_ACTIVATIONS
    m = ModelSpec(**{**LLAMA, "layers": 1})
    dec = Decoder(BuildCtx(m, seed=3))
    for p in dec.parameters():
        p.data = p.data.to(torch.bfloat16)
    state = {t.untyped_storage().data_ptr() for t in [*dec.parameters(), *dec.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in state:
            saved[s.data_ptr()] = s.nbytes()
        return t

    b = 2
    ids = torch.randint(m.vocab, (b, m.seq_len))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = dec.embed_tokens(ids)
        assert x.dtype == torch.bfloat16                 # the residual stream
        x = x.detach().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = dec.layers[0](x, dec.rope())
    assert y.dtype == torch.bfloat16
    want = layer_bytes(m, b * m.seq_len, 2, 1, False, "none", EXECUTOR_ACTIVATIONS)
    assert sum(saved.values()) == want, (sum(saved.values()), want)


# ---- ZeRO-3 prefetch ----------------------------------------------------------------------------------------
def _prefetch_job() -> dict:
    """dp2 ZeRO-3 (replicated twice over 4 ranks), 4 layers: the order of gather issues, waits and layer
    forward/backward boundaries, and the losses with and without prefetch."""
    from loom.executor import comm
    from loom.executor.dp import DataParallel

    d = _spec({"dp": 2, "zero": 3}, micro_batch=2, precision="fp32", model={**LLAMA, "layers": 4})
    events: list[tuple] = []
    issue, gather = DataParallel._issue, DataParallel._gather

    def rec_issue(self, u):
        events.append(("issue", u.index))
        issue(self, u)

    def rec_gather(self, u):
        if not u.gathered:
            events.append(("need", u.index))
        gather(self, u)

    DataParallel._issue, DataParallel._gather = rec_issue, rec_gather
    try:
        comm.LOG.clear()
        tr, losses, _ = _train(d, 2)
        n_with = sum(1 for r in comm.LOG.records if ">zero_allgather" in r.tag)
        # layer boundaries, recorded after the step's own hooks (registered earlier) have run
        live: list[int] = []                            # gathered or in-flight layer units at each layer's end
        count = lambda: sum(1 for u in tr.dp.units[:-1] if u.gathered or u.inflight is not None)
        def mark(what: str, i: int) -> None:             # a hook returning None leaves the output alone
            events.append((what, i))
            live.append(count())

        for i, layer in enumerate(tr.model.layers):
            layer.register_forward_hook(lambda *a, i=i: mark("fwd_end", i))
            layer.register_full_backward_hook(lambda *a, i=i: mark("bwd_end", i))
        events.clear()
        tr.step()
        trace = list(events)
        comm.LOG.clear()
        _, losses_off, _ = _train(d, 2, prefetch=False)
        n_without = sum(1 for r in comm.LOG.records if ">zero_allgather" in r.tag)
    finally:
        DataParallel._issue, DataParallel._gather = issue, gather
    return {"trace": trace, "live": live, "losses": losses, "losses_off": losses_off, "n_with": n_with, "n_without": n_without,
            "layers": len(tr.model.layers), "units": len(tr.dp.units)}


@pytest.mark.slow
def test_zero3_prefetches_the_next_layer_while_this_one_computes(results):
    r = results["trace"][0]
    n = r["layers"]
    unit = lambda layer: n - 1 - layer                   # units are in reverse layer order, the root last
    ev = r["trace"]
    pos = lambda e: [k for k, x in enumerate(ev) if x == e]
    for i in range(n - 1):                                # forward: layer i+1's gather issued before layer i ends
        assert pos(("issue", unit(i + 1)))[0] < pos(("fwd_end", i))[0], ev
    for i in range(1, n):                                 # backward: layer i-1's gather issued before i's ends
        issues = pos(("issue", unit(i - 1)))
        assert len(issues) >= 2 and issues[1] < pos(("bwd_end", i))[0], ev
    # a need is cold when the gather is issued only then; per micro-batch only the first layer of the forward and
    # the last of the backward (and the root unit, gathered before the forward) start cold
    cold = [e[1] for k, e in enumerate(ev[:-1]) if e[0] == "need" and ev[k + 1] == ("issue", e[1])]
    warm = [e[1] for k, e in enumerate(ev[:-1]) if e[0] == "need" and ev[k + 1] != ("issue", e[1])]
    mbs = 2
    assert sorted(u for u in cold if u < n) == sorted([unit(0), unit(n - 1)] * mbs), ev
    assert len([u for u in warm if u < n]) == 2 * (n - 1) * mbs, ev
    # memory: at any layer's end at most two layer units are gathered (this one and the prefetched one); the
    # backward frees each layer once its gradients have landed instead of keeping all of them to the end
    assert max(r["live"]) <= 2, r["live"]
    assert r["losses"] == r["losses_off"]                 # bit for bit
    assert r["n_with"] == r["n_without"] > 0             # the same gathers, the plan's count


# ---- init ---------------------------------------------------------------------------------------------------
def test_init_never_materialises_a_full_sharded_tensor(monkeypatch):
    """A TP rank builds its part without any full-size tensor of a sharded parameter: every tensor created while
    it builds (seen by a dispatch mode: factories, copies, views' bases) is smaller than the smallest full sharded
    parameter (the model is chosen so that every shard is smaller than every full tensor), and the initialiser
    computes exactly this rank's elements (executor/init_rng.py's count): its shards, the replicated position
    table, nothing else. Tied embeddings on another stage compute the head's rows of the table again."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from loom.executor import model as model_mod
    from loom.executor.comm import Group
    from loom.executor.init_rng import DRAWN
    from loom.spec import ModelSpec

    class Sizes(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Sizes.biggest = max(Sizes.biggest, t.numel(), t.untyped_storage().nbytes() // t.element_size())
            return out

    # full sharded tensors: q, o 64·64, k, v 64·64, up, gate, down 96·64, embed/head 100·64 (>= 4096 elements);
    # their tp=2 shards hold at most 100/2·64 = 3200
    m = ModelSpec(**{**LLAMA, "hidden": 64, "heads": 4, "kv_heads": 4, "ffn_hidden": 96, "vocab": 100,
                     "tied_embeddings": True, "position": "learned"})
    smallest_full = 64 * 64
    for rank in range(2):
        for first, last in ((True, True), (True, False), (False, True)):
            Sizes.biggest, DRAWN["elements"] = 0, 0
            with Sizes():
                dec = model_mod.Decoder(model_mod.BuildCtx(m, Group("tp", None, 2, rank), seed=1),
                                        layers=range(2), first=first, last=last)
            assert 0 < Sizes.biggest < smallest_full, (rank, first, last, Sizes.biggest)
            drawn = sum(p.numel() for n, p in dec.named_parameters() if "norm" not in n)
            assert DRAWN["elements"] == drawn, (rank, first, last, DRAWN["elements"], drawn)
            assert all(p.device.type == "cpu" for p in dec.parameters())


# ---- fp8 specs run as bf16 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("par", [{"tp": 2, "sp": True}, {"dp": 2, "zero": 1}, {"dp": 2, "zero": 3}])
def test_fp8_specs_run_as_bf16_and_send_the_plans_bytes(par):
    """The executor has no fp8 GEMMs: an fp8 spec trains under bf16 autocast, which is what the plan counts for
    fp8's activations and parameters (2 bytes), so verify's prediction equals the plan's bytes for every kind."""
    from loom.executor.mesh import build_mesh
    from loom.executor.trainer import Trainer
    from loom.spec import spec_from_dict
    from loom.spec.compile import compile_plan
    from loom.verify_predict import comm_bytes, comm_notes, plan_comm_bytes
    d = _spec(par, precision="fp8")
    d["cluster"]["gpu"] = "H100-SXM"
    spec = spec_from_dict(d)
    got, plan = comm_bytes(spec, 0, "cuda:0"), plan_comm_bytes(compile_plan(spec), 0)
    for kind, want in plan.items():
        assert got[kind] == round(want), (kind, got[kind], want)
    assert comm_notes(spec)["zero_allgather"] == ""
    one = spec_from_dict({**d, "parallel": {"dp": 1}, "cluster": {**d["cluster"], "gpus_per_node": 1}})
    tr = Trainer(one, build_mesh(one.plan, "cpu"), torch.device("cpu"), 1)
    assert tr.amp_dtype == torch.bfloat16


# ---- the Trainer on CUDA (pytest -m gpu; skipped without CUDA) --------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_trainer_on_cuda_trains_like_the_cpu_bf16_run(recompute):
    """One GPU, bf16: the Trainer's CUDA path (CUDA autocast, the Triton kernels for norm, RoPE, attention,
    SwiGLU and the fused linear cross-entropy) against the same steps on CPU (bf16 autocast, the kernels' torch
    twins, the vocab-parallel loss). Different kernels round differently in bf16 (u = 2^-8), and the mean loss
    averages those errors over 128 tokens per micro-batch, so 3 steps agree to well under u: bound 2e-3 relative
    on the loss, 1e-2 on the gradient norm (of order u, see above)."""
    runs = {}
    for dev in ("cpu", "cuda"):
        from loom.executor.mesh import build_mesh
        from loom.executor.trainer import Trainer
        from loom.spec import spec_from_dict
        spec = spec_from_dict(_spec({}, micro_batch=4, recompute=recompute))
        tr = Trainer(spec, build_mesh(spec.plan, dev), torch.device(dev), STEPS)
        runs[dev] = [tr.step() for _ in range(STEPS)]
    for c, g in zip(runs["cpu"], runs["cuda"]):
        assert abs(g.loss - c.loss) / c.loss < 2e-3, (g.loss, c.loss)
        assert abs(g.grad_norm - c.grad_norm) / c.grad_norm < 1e-2, (g.grad_norm, c.grad_norm)
    assert runs["cuda"][-1].mem_bytes > 0
