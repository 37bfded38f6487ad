"""loom verify under recompute = "full", "selective" and "op" (per-op SAC): the layer activation bytes per
micro-batch, the activation bytes in flight and one recomputed layer's transient, measured by executor/measure.py
(saved tensors + torch.utils.checkpoint's inputs + the selective-checkpoint cache + what the recompute rebuilds,
by storage), against the memory model with the executor's kernels (simulator/activations.py layer_bytes,
recompute_transient_bytes; verify_predict.EXECUTOR_ACTIVATIONS).

Layouts on two gloo ranks: dp2 ZeRO-1 on examples/tiny-cpu.toml's model and batch (fp32 and bf16), tp2+SP, pp2
1F1B and dp2 ZeRO-3 on a smaller model. The layer, in-flight and transient rows must be equal to the byte (in flight: the memory
model's buffers plus verify_predict.executor_buffer_extras, the final norm's statistics and the cross-entropy's
targets and mask the memory model leaves out). An independent single-process count (liveness of op outputs, as
tests/test_sac_executor.py measures) checks that the method sees what the layers really keep.
"""
from __future__ import annotations

import json
import tempfile
import tomllib
from pathlib import Path

import pytest

from loom.spec.load import spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
CACHE = tempfile.mkdtemp(prefix="loom-verify-rc-data-")
MODES = ("full", "selective", "op")
SMALL = {"name": "t", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn_hidden": 128, "vocab": 257,
         "seq_len": 32}


def _tiny_cpu(recompute: str) -> dict:
    d = tomllib.loads((ROOT / "examples" / "tiny-cpu.toml").read_text())
    d.pop("run", None)
    d["training"]["recompute"] = recompute
    d["data"] = {"cache_dir": CACHE}
    return d


def _small(parallel: dict, recompute: str) -> dict:
    return {"model": dict(SMALL), "cluster": {"gpu": "cpu", "gpus_per_node": 2},
            "training": {"global_batch": 8, "micro_batch": 2, "precision": "fp32", "recompute": recompute,
                         "lr": 1e-3},
            "parallel": parallel, "data": {"cache_dir": CACHE}}


LAYOUTS = {
    "dp2-tiny-cpu": None,
    "tp2-sp": {"tp": 2, "sp": True},
    "pp2-1f1b": {"pp": 2, "schedule": "1f1b"},
    "dp2-zero3": {"dp": 2, "zero": 3},
    "dp2-tiny-cpu-bf16": "bf16",        # Megatron's bf16 layout: 2-byte saved tensors, fp32 rstd and lse
}


def spec_dict(layout: str, recompute: str) -> dict:
    if LAYOUTS[layout] in (None, "bf16"):
        d = _tiny_cpu(recompute)
        if LAYOUTS[layout] == "bf16":
            d["training"]["precision"] = "bf16"
        return d
    return _small(LAYOUTS[layout], recompute)


def _measure_job(d: dict, steps: int) -> dict:
    import torch
    from loom.executor.measure import measure
    return measure(spec_from_dict(d), steps, torch.device("cpu"))


@pytest.fixture(scope="module")
def measured() -> dict:
    from tests.test_executor_pp_harness import RankPool
    pool = RankPool(2)
    try:
        return {(lay, rc): {"ranks": pool.run(_measure_job, spec_dict(lay, rc), 2)}
                for lay in LAYOUTS for rc in MODES}
    finally:
        pool.close()


CASES = [(lay, rc) for lay in LAYOUTS for rc in MODES]


@pytest.mark.parametrize("layout,recompute", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_recompute_activation_rows_are_checked_and_exact(measured, layout, recompute):
    from loom.verify import compare
    spec = spec_from_dict(spec_dict(layout, recompute))
    rows = compare(spec, measured[(layout, recompute)])
    for stage in range(spec.plan.pp):
        layers = next(r for r in rows if r.metric.startswith("activation bytes per micro-batch")
                      and r.metric.endswith(f"(stage {stage})"))
        assert layers.tolerance == 0.03 and layers.ok is True
        assert layers.measured == layers.predicted > 0, (layers.metric, layers.predicted, layers.measured)
        flight = next(r for r in rows if r.metric == f"activation bytes in flight (stage {stage})")
        assert flight.ok is True and flight.measured == flight.predicted, (flight.predicted, flight.measured)
        tr = next(r for r in rows if r.metric == f"recompute transient bytes (stage {stage})")
        assert tr.ok is True and tr.measured == tr.predicted > 0, (tr.predicted, tr.measured)


def test_a_wrong_activation_count_fails(measured):
    """The rows can fail: 4 % more saved bytes in the layers, or a transient 4 % larger, is outside the 3 %."""
    from loom.verify import compare
    spec = spec_from_dict(spec_dict("tp2-sp", "op"))
    data = json.loads(json.dumps(measured[("tp2-sp", "op")]))
    for r in data["ranks"]:
        for s in r["steps"]:
            s["saved_layers_bytes"] = int(s["saved_layers_bytes"] * 1.04)
            s["recompute_transient_bytes"] = int(s["recompute_transient_bytes"] * 1.04)
    rows = {r.metric: r for r in compare(spec, data)}
    assert rows["activation bytes per micro-batch, 2 layers (stage 0)"].ok is False
    assert rows["recompute transient bytes (stage 0)"].ok is False


def test_recompute_keeps_less_than_no_recompute_in_the_order_the_model_says(measured):
    """dp2 on tiny-cpu: full keeps the layer input only, op keeps more, selective (FlashAttention: only the LSE
    dropped) almost everything; measured, not predicted."""
    from loom.verify import compare
    got = {}
    for rc in MODES:
        rows = compare(spec_from_dict(spec_dict("dp2-tiny-cpu", rc)), measured[("dp2-tiny-cpu", rc)])
        got[rc] = next(r.measured for r in rows if r.metric.startswith("activation bytes per micro-batch"))
    m = spec_from_dict(spec_dict("dp2-tiny-cpu", "full")).model
    assert got["full"] == 2 * 4 * 4 * m.seq_len * m.hidden          # 2 layers x fp32 x (b=4, s, h) inputs
    assert got["full"] < got["op"] < got["selective"]


@pytest.mark.parametrize("recompute", ["full", "op", "selective"])
def test_what_measure_counts_is_what_stays_alive(recompute):
    """Independent method (one process): every storage an op creates during the layers' forward that is still
    alive after it (a TorchDispatchMode's weak references; tests/test_sac_executor.py), plus the first layer's
    input, equals measure.py's count of the layers' kept bytes (saved tensors, checkpoint inputs, SAC cache)."""
    import torch
    from loom.executor.measure import SavedTensors
    from loom.executor.model import Block, BuildCtx, Decoder
    from loom.spec import ModelSpec
    from tests.test_sac_executor import kept_per_layer
    m = ModelSpec(**{k: v for k, v in SMALL.items() if k != "name"})
    torch.manual_seed(0)
    dec = Decoder(BuildCtx(m, recompute=recompute, seed=3))
    x0 = torch.randn(m.seq_len, 2, m.hidden, requires_grad=True)
    live = kept_per_layer(dec, x0) * m.layers
    saved = SavedTensors(list(dec.parameters()) + list(dec.buffers()))
    saved.watch_blocks([b for b in dec.modules() if isinstance(b, Block)])
    saved.new_step()
    with saved.hooks():
        y = dec.run_layers(x0)
        counted = saved.step["layers"]
        y.sum().backward()
    assert counted == live
    assert saved.live_bytes == 0                    # every hold released by the end of the backward


@pytest.mark.parametrize("option", ["tp_comm_overlap", "overlap_param_gather"])
def test_verify_refuses_the_overlap_options_before_the_node_check(tmp_path, capsys, option):
    """A two-node spec with an overlap option: `loom verify` names the overlap option (a property of the spec,
    checked first, as `loom run` does), not the node count."""
    import argparse
    from loom.verify import verify_cli
    par = {"tp": 2, "sp": True, "dp": 2, "zero": 1, option: True}
    toml = tmp_path / "o.toml"
    toml.write_text("\n".join([
        "[model]", *(f"{k} = {json.dumps(v)}" for k, v in SMALL.items()),
        "[cluster]", 'gpu = "cpu"', "gpus_per_node = 2", "nodes = 2",
        "[training]", "global_batch = 8", "micro_batch = 2", 'precision = "fp32"',
        "[parallel]", *(f"{k} = {json.dumps(v)}" for k, v in par.items())]))
    args = argparse.Namespace(file=str(toml), profile=None, steps=1, json=False, tol=None, trace=None)
    assert verify_cli(args) == 2
    err = capsys.readouterr().err
    assert f"parallel.{option} = true" in err and "cluster.nodes" not in err, err
