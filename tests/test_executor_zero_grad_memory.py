"""One truth for ZeRO-1/2 model-state memory: what executor/dp.py holds is what simulator/memory.py charges.

Four gloo ranks train one step with gradient accumulation (2 micro-batches per replica) under ZeRO-1 and ZeRO-2,
without PP (dp4) and with it (dp2×pp2 1F1B; ZeRO-2 also interleaved with tied embeddings, whose tied chunk reduces
once per step). After the step each rank's parameter, gradient and optimizer bytes (executor/measure.py's
storage count) must equal the memory model's stage figures to the byte. During the backward, ZeRO-2 must never
hold more than two units' full gradients at once (the memory model's 2 × bucket_MB in comm_buffers), and ZeRO-1
must hold no second copy of the reduced shard (it is a view of the full buffer).

The same under bf16, for every ZeRO stage (0-3; with PP; bf16 gradients too): the module parameters are 2 bytes,
the fp32 masters are optimizer state (12 bytes per updated parameter with AdamW's moments), Megatron-LM's layout
and the memory model's (executor/dp.py).
"""
from __future__ import annotations

import copy

import pytest

MODEL = {"layers": 4, "hidden": 32, "heads": 4, "kv_heads": 2, "ffn_hidden": 64, "vocab": 258, "seq_len": 16,
         "rope_theta": 10000.0}


def _spec(par: dict, model: dict | None = None, precision: str = "fp32", grad_dtype: str = "fp32") -> dict:
    return {"model": copy.deepcopy(model or MODEL), "cluster": {"gpu": "cpu", "gpus_per_node": 4},
            "training": {"global_batch": 8, "micro_batch": 2 if par.get("pp", 1) > 1 else 1, "precision": precision,
                         "grad_dtype": grad_dtype, "lr": 1e-3, "warmup_steps": 1, "grad_clip": 1.0},
            "parallel": {"bucket_MB": 0.01, **par}}


# odd sizes (hidden 33, vocab 257, biases): every unit is padded to a multiple of dp, which the model counts too
ODD = {"layers": 2, "hidden": 33, "heads": 3, "ffn_hidden": 66, "vocab": 257, "seq_len": 16, "bias": True,
       "norm": "layernorm", "activation": "gelu", "position": "learned"}

LAYOUTS = {
    "dp4_zero1": _spec({"dp": 4, "zero": 1}),
    "dp4_zero1_odd": _spec({"dp": 4, "zero": 1}, model=ODD),
    "dp4_zero2_odd": _spec({"dp": 4, "zero": 2}, model=ODD),
    "dp4_zero2": _spec({"dp": 4, "zero": 2}),
    "dp2_pp2_zero1": _spec({"dp": 2, "pp": 2, "zero": 1, "schedule": "1f1b"}),
    "dp2_pp2_zero2": _spec({"dp": 2, "pp": 2, "zero": 2, "schedule": "1f1b"}),
    "dp2_pp2_zero2_tied_interleaved": _spec({"dp": 2, "pp": 2, "zero": 2, "schedule": "interleaved", "vpp": 2},
                                            model={**MODEL, "tied_embeddings": True}),
    # bf16: 2-byte parameters, the fp32 master under the optimizer
    "bf16_dp4_zero0": _spec({"dp": 4}, precision="bf16"),
    "bf16_dp4_zero1_odd": _spec({"dp": 4, "zero": 1}, model=ODD, precision="bf16"),
    "bf16_dp4_zero2": _spec({"dp": 4, "zero": 2}, precision="bf16", grad_dtype="bf16"),
    "bf16_dp4_zero3_odd": _spec({"dp": 4, "zero": 3}, model=ODD, precision="bf16"),
    "bf16_dp2_pp2_zero1": _spec({"dp": 2, "pp": 2, "zero": 1, "schedule": "1f1b"}, precision="bf16"),
    "bf16_dp2_pp2_zero3": _spec({"dp": 2, "pp": 2, "zero": 3, "schedule": "1f1b"}, precision="bf16"),
}


def _job(layouts: dict) -> dict:
    import torch

    from loom.executor.measure import state_bytes
    from loom.executor.mesh import build_mesh
    from loom.executor.trainer import Trainer
    from loom.spec import spec_from_dict

    out = {}
    for name, d in layouts.items():
        spec = spec_from_dict(d)
        tr = Trainer(spec, build_mesh(spec.plan, "cpu"), torch.device("cpu"), steps=2)
        dps = getattr(tr.dp, "dps", [tr.dp])
        units = [u for dp in dps for u in dp.units]
        peak = {"alive": 0}

        def alive() -> int:
            return sum(u.grad.untyped_storage().nbytes() for u in units)

        for dp in dps:                                    # watch the full buffers as gradients land
            orig = dp._on_grad

            def watched(p, orig=orig):
                orig(p)
                peak["alive"] = max(peak["alive"], alive())
            for p in dp.unit_of:
                p._post_accumulate_grad_hooks.clear()
                p.register_post_accumulate_grad_hook(watched)
        tr.step()
        tr.step()

        def rounded(dp, u) -> bool:                      # what the model computes with = the rounded master
            if u.shard_lowp is not None:
                return torch.equal(u.shard_lowp, u.shard_param.to(u.shard_lowp.dtype))
            per = u.numel // dp.dp.size
            own = u.flat[dp.dp.rank * per:(dp.dp.rank + 1) * per] if dp.zero >= 1 and dp.dp.active else u.flat
            return torch.equal(own, u.shard_param.to(u.flat.dtype))
        chunk_dps = [d for dp in dps for d in getattr(dp, "dps", [dp])]
        out[name] = {"param_dtypes": sorted({str(q.dtype) for d in chunk_dps for q in d.model.parameters()}),
                     "master_dtypes": sorted({str(u.shard_param.dtype) for u in units}),
                     "rounded": all(rounded(d, u) for d in chunk_dps for u in d.units),
                     "stage": tr.mesh["pp"].rank, "state": state_bytes([tr.dp], tr.opt),
                     "peak_alive": peak["alive"], "units": [u.numel * u.grad.element_size() for u in units],
                     "shard_is_view": [u.shard_grad is not None and u.shard_grad.untyped_storage().data_ptr()
                                       == u.grad.untyped_storage().data_ptr() for u in units]}
    return out


@pytest.fixture(scope="module")
def measured() -> dict:
    from tests.test_executor_pp_harness import RankPool
    pool = RankPool(4)
    try:
        ranks = pool.run(_job, LAYOUTS)
    finally:
        pool.close()
    return {name: [r[name] for r in ranks] for name in LAYOUTS}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_measured_states_equal_the_memory_model(measured, name):
    from loom.simulator.memory import memory_report
    from loom.spec import spec_from_dict
    spec = spec_from_dict(LAYOUTS[name])
    assert spec.micro_batches == 2                       # gradient accumulation in every layout
    mem = memory_report(spec)
    for r in measured[name]:
        st = mem.per_stage[r["stage"]]
        if "odd" in name:
            assert r["state"]["padded_elements"] > r["state"]["param_elements"]       # padding is exercised
        got = {k: r["state"][k] for k in ("params", "grads", "optimizer")}
        assert got == {"params": st.params, "grads": st.grads, "optimizer": st.optimizer}, (name, r["stage"])


@pytest.mark.parametrize("name", [n for n in LAYOUTS if "zero2" in n])
def test_zero2_holds_at_most_two_units_of_full_gradients(measured, name):
    tied = "tied" in name
    for r in measured[name]:
        units = sorted(r["units"], reverse=True)
        if tied:          # the chunk holding the table accumulates its full gradients for the step
            assert r["peak_alive"] > 0
            continue
        assert 0 < r["peak_alive"] <= units[0] + units[1], (name, r["peak_alive"], units)
        assert r["peak_alive"] < sum(units)               # never the whole stage's gradients


@pytest.mark.parametrize("name", [n for n in LAYOUTS if "zero1" in n])
def test_zero1_reduces_in_place(measured, name):
    for r in measured[name]:
        assert all(r["shard_is_view"]), name
        assert r["state"]["grads"] == sum(r["units"])    # the full buffer, nothing beside it


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n.startswith("bf16")])
def test_bf16_parameters_are_the_rounded_fp32_masters(measured, name):
    """bf16 module parameters (the linears read them without autocast copies), fp32 masters the optimizer
    updates, and after every step the parameters hold exactly the masters rounded (ZeRO-1/2 through the gather,
    ZeRO-0 by a local copy, ZeRO-3 in its persistent bf16 shard)."""
    for r in measured[name]:
        assert r["param_dtypes"] == ["torch.bfloat16"] and r["master_dtypes"] == ["torch.float32"], name
        assert r["rounded"], name
