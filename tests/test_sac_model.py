"""Per-op selective recompute (recompute = "op", torchtitan's per-op SAC) in the spec, the memory model and the plan.

The expected figures are counted by hand from the policy's definition (torchtitan
torchtitan/models/llama3/infra/parallelize.py `_save_list` and its "every second mm" rule): the block keeps its
input, the outputs of its 1st, 3rd, 5th and 7th matmul (Q, V, gate, down for SwiGLU; Q, V, up for GELU) and the
attention kernel's (out, lse); its recompute reruns the 2nd, 4th, 6th matmul (K, output projection, up or down).
"""
from __future__ import annotations

import tomllib

import pytest

from loom.simulator import simulate_time
from loom.simulator.activations import full_layer_bytes, layer_bytes, op_layer_bytes
from loom.simulator.fast_cost import fast_step
from loom.simulator.memory import memory_report
from loom.spec import ModelSpec, SpecError, compile_plan, spec_from_dict
from loom.spec.export import export_torchtitan, megatron_args
from loom.spec.plan import OpKind

# hidden 64, 4 heads of 16 (q_dim 64), 2 KV heads (kv_dim 32), ffn 128
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab=256, seq_len=16)


def test_kept_bytes_counted_by_hand_swiglu():
    m = ModelSpec(**TINY)
    T, e = 32, 2                      # micro-batch 2 × 16 tokens, bf16
    x = e * T * 64                    # block input (checkpoint keeps it)
    q = e * T * 64                    # mm 1: Q projection
    v = e * T * 32                    # mm 3: V projection
    gate = e * T * 128                # mm 5: gate projection (torchtitan w1)
    down = e * T * 64                 # mm 7: down projection (w2), row-parallel partial sum
    out, lse = e * T * 64, 4 * T * 4  # attention output, fp32 log-sum-exp per (token, head)
    assert op_layer_bytes(m, T, e, tp=1, sp=False) == x + q + v + gate + down + out + lse == 27136
    assert layer_bytes(m, T, e, 1, False, "op") == 27136
    # TP 2: Q, V, gate, attention out and lse split; the row-parallel down output and the input do not
    assert op_layer_bytes(m, T, e, tp=2, sp=False) == x + q / 2 + v / 2 + gate / 2 + down + out / 2 + lse / 2
    # + SP: the input is a sequence shard; the down projection's output is still the full partial sum
    assert op_layer_bytes(m, T, e, tp=2, sp=True) == x / 2 + q / 2 + v / 2 + gate / 2 + down + out / 2 + lse / 2


def test_kept_bytes_counted_by_hand_gelu():
    """GELU MLP: six matmuls (Q, K, V, O, up, down); the 1st, 3rd, 5th are kept: Q, V, up."""
    m = ModelSpec(**{**TINY, "activation": "gelu", "norm": "layernorm", "position": "learned", "bias": True})
    T, e = 16, 4
    x, q, v, up = e * T * 64, e * T * 64, e * T * 32, e * T * 128
    out, lse = e * T * 64, 4 * T * 4
    assert op_layer_bytes(m, T, e, tp=1, sp=False) == x + q + v + up + out + lse


def test_op_sits_between_selective_and_full_for_llama3_8b():
    """Llama 3 8B, micro-batch 2 × 8192, bf16: op keeps 2h + 2q + kv + f elements per token plus the LSE; less
    than selective (which keeps nearly everything under FlashAttention) and more than full (the input only)."""
    m = ModelSpec(layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=128256, seq_len=8192)
    T = 2 * 8192
    want = 2 * T * (2 * 4096 + 2 * 4096 + 1024 + 14336) + 4 * T * 32
    assert layer_bytes(m, T, 2, 1, False, "op") == want
    assert layer_bytes(m, T, 2, 1, False, "full") < want < layer_bytes(m, T, 2, 1, False, "selective")


def test_recompute_flops_counted_by_hand():
    m = ModelSpec(**TINY)
    # rerun per token per layer: K (64→32), output projection (64→64), up (64→128), 2 FLOPs per MAC
    per_layer = 2 * 64 * 32 + 2 * 64 * 64 + 2 * 64 * 128
    assert m.op_recompute_flops_per_token() == per_layer
    assert m.train_flops_per_token("op") - m.train_flops_per_token("none") == pytest.approx(2 * per_layer)
    g = ModelSpec(**{**TINY, "activation": "gelu"})      # K, output projection, down (128→64): the same sizes
    assert g.op_recompute_flops_per_token() == per_layer


def _spec(recompute: str = "op", **par) -> object:
    p = {"dp": 1, "tp": 1, "pp": 1, "cp": 1, **par}
    world = p["dp"] * p["tp"] * p["pp"] * p["cp"]
    return spec_from_dict({"model": {**TINY, "layers": 4}, "cluster": {"gpu": "H100-SXM", "gpus_per_node": world},
                           "training": {"global_batch": 4 * p["dp"], "micro_batch": 2, "recompute": recompute},
                           "parallel": p})


@pytest.mark.parametrize("par", [{}, {"tp": 2}, {"tp": 2, "sp": True}, {"pp": 2, "dp": 2}])
def test_plan_recompute_ops_and_flops(par):
    spec = _spec(**par)
    plan = compile_plan(spec)
    assert plan.total_flops() == pytest.approx(spec.model.train_flops_per_token("op") * spec.tokens_per_step)
    rec = [o for o in plan.ops() if o.kind == OpKind.RECOMPUTE]
    assert rec and all(o.attn_flops == 0 and o.flops > 0 and o.mem_bytes > 0 for o in rec)
    # TP collectives rerun like full recompute's (the checkpoint's early stop skips the MLP's reduction)
    full = compile_plan(_spec("full", **par))
    tp_kinds = (OpKind.TP_ALLREDUCE, OpKind.SP_ALLGATHER, OpKind.SP_REDUCESCATTER)

    def calls(p):
        return sorted((o.kind.value, o.count) for o in p.ops() if o.kind in tp_kinds)
    assert calls(plan) == calls(full)


@pytest.mark.parametrize("par", [{"dp": 8}, {"tp": 8, "sp": True}, {"pp": 2, "tp": 4}])
def test_fast_path_prices_the_same_recompute(par):
    """fast_cost mirrors compile_plan's recompute op (within the 5 % the search relies on, at a real size)."""
    p = {"dp": 1, "tp": 1, "pp": 1, "cp": 1, **par}
    d = {"model": {"preset": "llama3-8b"}, "cluster": {"gpu": "H100-SXM", "gpus_per_node": 8},
         "training": {"global_batch": 16, "micro_batch": 1, "recompute": "op"}, "parallel": p}
    spec = spec_from_dict(d)
    assert fast_step(spec).step_time_s == pytest.approx(simulate_time(spec).step_time_s, rel=0.05)
    # and charges more than no recompute, less than full recompute
    t = {r: fast_step(spec_from_dict({**d, "training": {**d["training"], "recompute": r}})).step_time_s
         for r in ("none", "full")}
    assert t["none"] < fast_step(spec).step_time_s < t["full"]


def test_memory_report_uses_op_policy():
    spec = _spec(dp=2)
    st = memory_report(spec).per_stage[0]
    m, T = spec.model, 2 * 16
    assert st.activations == int(4 * op_layer_bytes(m, T, 2, 1, False))
    # the transient of one recomputed layer: its complete saved set less what it kept
    assert st.workspace >= full_layer_bytes(m, T, 2, 1, False) - op_layer_bytes(m, T, 2, 1, False)
    peaks = {r: memory_report(_spec(r, dp=2)).peak_bytes for r in ("none", "selective", "op", "full")}
    assert peaks["full"] < peaks["op"] < peaks["selective"] <= peaks["none"]


def test_op_with_context_parallel_is_a_named_error():
    with pytest.raises(SpecError) as e:
        _spec(cp=2)
    assert any(i.field == "training.recompute" for i in e.value.issues)


def test_exports():
    spec = _spec(dp=2)
    ac = tomllib.loads(export_torchtitan(spec))["activation_checkpoint"]
    assert ac == {"mode": "selective", "selective_ac_option": "op"}
    with pytest.raises(SpecError) as e:
        megatron_args(spec)
    assert e.value.issues[0].field == "training.recompute"


def test_sim_accuracy_maps_per_op_sac_to_op():
    """benchmarks/sim_accuracy.py applies the same rule as memory_accuracy.py's recompute_for."""
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sim_accuracy.py"
    spec = importlib.util.spec_from_file_location("sim_accuracy_for_sac", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if not bench.RUNS.exists():
        pytest.skip(f"reference data {bench.RUNS} not present")
    runs = [r for r in json.loads(bench.RUNS.read_text()) if "per-op" in (r["parallel"].get("recompute") or "")]
    assert len(runs) == 14
    assert {bench.spec_for_run(r).training.recompute for r in runs} == {"op"}
    assert [bench._recompute(v) for v in ("full", "selective", None, "none")] == ["full", "selective", "selective",
                                                                                 "none"]
