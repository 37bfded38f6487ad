"""verify's predictions checked without starting processes: the parameter layout against the real executor
modules, the padded DP units against the memory model, the [verify] tolerance table, and exposed-comm accounting."""
from __future__ import annotations

import json

import pytest

from loom.spec.load import spec_from_dict
from verify_specs import BASE, make_spec


# ---- the spec-side layout prediction against the real executor modules (no processes) -----------------------------
@pytest.mark.parametrize("model,tp,first,last", [
    ({}, 1, True, True), ({}, 2, True, True), ({"bias": True, "norm": "layernorm", "activation": "gelu"}, 2, True, True),
    ({"position": "learned"}, 1, True, False), ({"tied_embeddings": False}, 2, False, True),
    ({"tied_embeddings": False, "position": "learned"}, 2, True, True), ({}, 2, False, False)])
def test_param_layout_matches_the_executor(model, tp, first, last):
    import torch
    from loom.executor.comm import Group
    from loom.executor.model import BuildCtx, Decoder
    from loom.verify_predict import _chunk_params
    spec = make_spec({"tp": tp, "dp": 2 // tp}, **model)
    for rank in range(tp):
        g = Group("tp", None, tp, rank)           # construction only slices tensors: no communication
        dec = Decoder(BuildCtx(spec.model, tp=g, device=torch.device("cpu")), layers=range(2), first=first, last=last)
        real = [p.numel() for p in dict.fromkeys(dec.parameters())]
        assert [q.numel for q in _chunk_params(spec, range(2), first, last)] == real


def test_units_pad_to_the_dp_group_and_bucket_in_reverse_order():
    from loom.simulator.memory import memory_report
    from loom.verify_predict import chunk_units, state_elements
    spec = make_spec({"dp": 2, "zero": 1, "bucket_MB": 0.05})
    units = chunk_units(spec, range(2), True, True)
    assert all(u.numel % 2 == 0 for u in units)
    assert all(sum(q.numel for q in u.params) * 4 >= 0.05 * 2**20 for u in units[:-1])   # closed buckets are full
    s = state_elements(spec, 0)
    assert s["padded_elements"] == sum(u.numel for u in units) >= s["param_elements"]
    # the memory model counts these padded units (the verify rows' prediction)
    st = memory_report(spec).per_stage[0]
    assert st.params == s["padded_elements"] * 4
    assert st.grads == s["padded_elements"] * 4          # ZeRO-1: the full buffer, reduced in place (no shard copy)
    assert st.optimizer == s["padded_elements"] // 2 * 4 * 2                       # AdamW m, v over the shard


def test_verify_table_in_spec_is_validated_and_overrides():
    from loom.spec import SpecError
    from loom.verify import parse_tol, tolerances
    d = json.loads(json.dumps(BASE))
    d["parallel"] = {"dp": 2}
    d["verify"] = {"activations": 0.5, "bubble": 0.2}
    tol = tolerances(spec_from_dict(d), parse_tol(["comm_bytes=0.1", "exposed_comm=none"]))
    assert tol["activations"] == 0.5 and tol["bubble"] == 0.2 and tol["comm_bytes"] == 0.1
    assert tol["exposed_comm"] is None and tol["step_time_cpu"] == 0.25
    d["verify"] = {"activation": 0.1}
    with pytest.raises(SpecError) as e:
        spec_from_dict(d)
    assert "verify.activation" in str(e.value.issues[0])
    with pytest.raises(ValueError, match="unknown metric"):
        parse_tol(["steptime=0.1"])


def test_measured_exposed_comm_counts_only_uncovered_time():
    """A 10 ms forward with a blocking 2 ms TP all-reduce inside and a DP reduce from 8 to 14 ms: tp exposed 2 ms
    (blocking), dp exposed 4 ms (10..14; 8..10 overlaps the forward's compute)."""
    from loom.spec.plan import OpKind
    from loom.verify import measured_exposed_comm
    spec = make_spec({"dp": 2})
    from loom.spec.compile import compile_plan
    plan = compile_plan(spec)
    fwd = next(op for op in plan.program(0) if op.kind == OpKind.FORWARD)
    step = {"ops": [[fwd.id, 0.0, 0.010]],
            "comm": [{"kind": "all_reduce", "group": "tp", "bytes": 1, "tag": "forward", "start": 0.004, "end": 0.006},
                     {"kind": "reduce_scatter", "group": "dp", "bytes": 1, "tag": "x>dp_reducescatter", "start": 0.008,
                      "end": 0.014}]}
    e = measured_exposed_comm(plan, step)
    assert e["tp"] == pytest.approx(0.002) and e["dp"] == pytest.approx(0.004)


# ---- names, full shapes and TP splits (checkpoint resharding, executor/reshard.py) against the real modules -------
@pytest.mark.parametrize("model,tp,first,last", [
    ({}, 1, True, True), ({}, 2, True, True),
    ({"bias": True, "norm": "layernorm", "activation": "gelu"}, 2, True, True),
    ({"position": "learned"}, 1, True, False), ({"tied_embeddings": False}, 2, False, True),
    ({"tied_embeddings": False, "position": "learned"}, 2, True, True), ({}, 2, False, False),
    ({"vocab": 259}, 2, True, True), ({"vocab": 259, "tied_embeddings": False}, 2, False, True)])
def test_param_names_shapes_and_splits_match_the_executor(model, tp, first, last):
    """Each Param's name is the Decoder's parameter name with the global layer index, its full shape is what the TP
    shards concatenate to along `split` (the vocabulary cut back to `vocab`), and replicated ones have the shard's
    shape: checked on every TP rank of chunks that start at layer 1 (so local and global indices differ)."""
    import torch
    from loom.executor.comm import Group
    from loom.executor.model import BuildCtx, Decoder
    from loom.spec.units import chunk_tensors, padded_vocab
    spec = make_spec({"tp": tp, "dp": 2 // tp}, **model)
    m = spec.model
    shards: dict[str, list[torch.Tensor]] = {}
    for rank in range(tp):
        g = Group("tp", None, tp, rank)
        dec = Decoder(BuildCtx(m, tp=g, device=torch.device("cpu")), layers=range(1, 3), first=first, last=last)
        real = []
        for name, prm in dec.named_parameters():
            parts = name.split(".")
            if parts[0] == "layers":
                parts[1] = str(dec.layers[int(parts[1])].index)
            real.append((".".join(parts), tuple(prm.shape), getattr(prm, "loom_tp_split", False) and
                         getattr(prm, "loom_tp_dim", 0)))
            shards.setdefault(real[-1][0], []).append(prm.detach())
        pred = chunk_tensors(m, tp, spec.plan.sp, range(1, 3), first, last)
        assert [q.name for q in pred] == [r[0] for r in real]
        for q, (name, shape, dim) in zip(pred, real):
            assert q.numel == torch.Size(shape).numel()
            if q.split is None:
                assert q.shape == shape and (tp == 1 or dim is False)
            else:
                assert tp == 1 or dim == q.split
                full = list(q.shape)
                if q.vocab_padded:
                    full[0] = padded_vocab(full[0], tp)
                full[q.split] //= tp
                assert tuple(full) == shape
    for q in chunk_tensors(m, tp, spec.plan.sp, range(1, 3), first, last):
        if q.split is not None:        # the shards concatenate to the full tensor; the vocabulary padding is zeros
            full = torch.cat(shards[q.name], q.split)
            assert full.shape[q.split] >= q.shape[q.split]
            pad = full.narrow(q.split, q.shape[q.split], full.shape[q.split] - q.shape[q.split])
            assert torch.count_nonzero(pad) == 0
