"""SGD's optimizer state in the memory model: one fp32 momentum buffer per parameter (torch.optim.SGD's
momentum_buffer; Loom's "sgd" is momentum SGD, executor/optim.py), plus the fp32 master copy under mixed precision,
sharded over dp·cp from ZeRO-1 on. Derived by hand from the parameter count, and compared with what the executor
allocates on one CPU process (fp32, and bf16 with its fp32 masters in the optimizer)."""
from __future__ import annotations

import pytest

from loom.simulator.fit_advice import states_floor
from loom.simulator.memory import memory_report, optimizer_bytes
from loom.spec import ModelSpec, spec_from_dict

TINY = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "ffn_hidden": 64, "vocab": 258, "seq_len": 16}


def _spec(training: dict, parallel: dict | None = None, gpus: int = 1, model: dict | None = None):
    return spec_from_dict({"model": model or TINY, "cluster": {"gpu": "cpu", "gpus_per_node": gpus},
                           "training": {"global_batch": 8, "micro_batch": 1, "optimizer": "sgd", **training},
                           "parallel": parallel or {}})


@pytest.mark.parametrize("precision, per_param", [("fp32", 4), ("bf16", 4 + 4)])
def test_sgd_keeps_a_momentum_buffer_per_parameter(precision, per_param):
    """No ZeRO, one rank: momentum 4 B/param (+ master 4 B/param under bf16), n from the ModelSpec's count."""
    spec = _spec({"precision": precision})
    n = ModelSpec(**TINY).param_count()          # tp = 1 pads no vocabulary rows; one rank pads no shards
    st = memory_report(spec).per_stage[0]
    assert st.optimizer == per_param * n
    assert optimizer_bytes(spec) == per_param
    # half of AdamW's state (m and v) in fp32
    adam = memory_report(spec.model_copy(update={"training": spec.training.model_copy(
        update={"optimizer": "adamw"})})).per_stage[0]
    assert adam.optimizer - st.optimizer == 4 * n


def test_sgd_momentum_is_sharded_under_zero1():
    """ZeRO-1 over dp = 4: each rank keeps a quarter of the (padded) momentum and master copies."""
    full = memory_report(_spec({"precision": "bf16"}, {"dp": 4}, gpus=4)).per_stage[0]
    z1 = memory_report(_spec({"precision": "bf16"}, {"dp": 4, "zero": 1}, gpus=4)).per_stage[0]
    assert z1.optimizer * 4 == full.optimizer
    assert z1.params == full.params and z1.grads == full.grads


def test_fit_advice_floor_counts_the_momentum():
    """fit_advice's lower bound (all states over every GPU) reads optimizer_bytes: fp32 SGD is params 4 + grads 4
    + momentum 4 = 12 bytes per parameter, over the 4 GPUs."""
    spec = _spec({"precision": "fp32"}, {"dp": 4}, gpus=4)
    n = ModelSpec(**TINY).param_count()
    assert states_floor(spec) == -(-n * 12 // 4)


@pytest.mark.parametrize("precision, per_param", [("fp32", 4), ("bf16", 8)])
def test_executor_sgd_state_equals_the_memory_model(precision, per_param):
    """One CPU process: the executor's optimizer storages after a step (its momentum buffers, plus the fp32 masters
    under bf16) are the memory model's optimizer bytes, and nothing else (no second moment)."""
    torch = pytest.importorskip("torch")
    from loom.executor.measure_state import state_bytes
    from loom.executor.mesh import build_mesh
    from loom.executor.trainer import Trainer

    spec = _spec({"precision": precision, "lr": 1e-2, "warmup_steps": 1})
    tr = Trainer(spec, build_mesh(spec.plan, "cpu"), torch.device("cpu"), steps=1)
    tr.step()
    st = memory_report(spec).per_stage[0]
    got = state_bytes(getattr(tr.dp, "dps", [tr.dp]), tr.opt)
    assert got["optimizer"] == st.optimizer == per_param * got["padded_elements"]
    assert (got["params"], got["grads"]) == (st.params, st.grads)
    assert not tr.opt.v and all(m.abs().sum() > 0 for m in tr.opt.m)     # the buffers are momentum, and used
