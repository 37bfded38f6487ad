"""Resuming a checkpoint under another parallel layout (executor/reshard.py, executor/train.py `resume_path`).

Each case trains N = 2 steps in layout A on gloo ranks, saves, reshards to layout B (one process, no process group)
and resumes in B for M = 2 more steps. Checked:
(a) exact (resharding is data movement): the masters B loads equal A's full parameters bit for bit; the full
    masters and moments rebuilt from B's checkpoint equal those rebuilt from A's; the source's rebuilt masters
    equal A's own `Trainer.full_state`; the keys every rank of B saves are the keys `layout(B)` predicts;
(b) the N + M losses equal a straight single-process run of N + M steps within the parity suite's relative 1e-5
    (docs/executor.md: fp32 reduction-order differences ~1e-7 per add; a moment dropped or misplaced moves a loss by
    ~1e-3, a step of lr = 3e-3 on every parameter, so it fails).
Layouts: dp2 ZeRO-1 -> tp2+SP (through `resume_path`, as `loom run` does); tp2 -> dp2 ZeRO-3; pp2 1F1B with tied
embeddings (two copies of the table) -> dp2 ZeRO-2; pp2 interleaved (vpp 2: two chunks per stage) -> cp2 ZeRO-1
(units sharded over the dp x cp group). The vocabulary, 257, is odd: tp2 pads it to 258 (a zero row). Small
buckets (bucket_MB 0.01) give several units per rank. A last test checks the writer's streaming in one process.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

MODEL = {"layers": 4, "hidden": 32, "heads": 4, "kv_heads": 2, "ffn_hidden": 64, "vocab": 257, "seq_len": 16,
         "tied_embeddings": True, "rope_theta": 10000.0}
N, M = 2, 2
WORLD = 2
LOSS_TOL = 1e-5                        # the parity suite's (docs/executor.md), relative


def _spec(par: dict, model: dict | None = None, optimizer: str = "adamw", **training) -> dict:
    par = {"bucket_MB": 0.01, **par}
    size = par.get("dp", 1) * par.get("tp", 1) * par.get("pp", 1) * par.get("cp", 1)
    return {"model": copy.deepcopy(model or MODEL), "cluster": {"gpu": "cpu", "gpus_per_node": size},
            "training": {"global_batch": 8, "micro_batch": 2, "precision": "fp32", "lr": 3e-3, "optimizer": optimizer,
                         "warmup_steps": 1, "grad_clip": 1.0, "weight_decay": 0.1, **training},
            "parallel": par}


CASES = {
    "dp2z1_to_tp2sp": (_spec({"dp": 2, "zero": 1}), _spec({"tp": 2, "sp": True})),
    "tp2_to_dp2z3": (_spec({"tp": 2}), _spec({"dp": 2, "zero": 3})),
    "pp2_tied_to_dp2z2": (_spec({"pp": 2, "schedule": "1f1b"}), _spec({"dp": 2, "zero": 2})),
    "pp2_interleaved_to_cp2z1": (_spec({"pp": 2, "schedule": "interleaved", "vpp": 2}), _spec({"cp": 2, "zero": 1})),
}
VIA_TRAIN = "dp2z1_to_tp2sp"           # resharded by train.resume_path (loom run's code), the rest by reshard()


def _trainer(d: dict):
    import torch.distributed as dist
    from loom.executor.mesh import build_mesh
    from loom.executor.trainer import Trainer
    from loom.spec import spec_from_dict
    spec = spec_from_dict(d)
    mesh = build_mesh(spec.plan, "cpu", replicas=dist.get_world_size() // spec.plan.size)
    return spec, Trainer(spec, mesh, torch.device("cpu"), N + M)


def _job(cases: dict, tmp: str) -> dict:
    import torch.distributed as dist
    from loom.executor import checkpoint
    from loom.executor.reshard import layout, read_full, reshard
    from loom.executor.train import resume_path
    rank0 = dist.get_rank() == 0
    out: dict = {}
    for name, (a, b) in cases.items():
        res: dict = {}
        spec_a, tr = _trainer(a)
        res["losses"] = [tr.step().loss for _ in range(N)]
        res["full_a"] = tr.full_state()
        ck = tr.save(Path(tmp) / name)
        dist.barrier()
        spec_b, tr = _trainer(b)
        if name == VIA_TRAIN:
            dst = resume_path(ck, spec_b)
        else:
            dst = checkpoint.resharded_dir(ck, layout(spec_b).tag())
            if rank0:
                reshard(ck, spec_a, spec_b, dst)
            dist.barrier()
        tr.load(dst)
        res["full_b"] = tr.full_state()
        res["keys_b"] = {k: tuple(v.shape) for k, v in tr.state_dict().items()}
        res["losses"] += [tr.step().loss for _ in range(M)]
        if rank0:
            res["dst"] = str(dst)
            res["read_a"] = read_full(ck, layout(spec_a))[0]
            res["read_b"] = read_full(dst, layout(spec_b))[0]
            res["layout_keys_b"] = layout(spec_b).keys()
        out[name] = res
    spec_r, tr = _trainer(_spec({}))                 # the straight single-process run (2 replicas of it)
    out["reference"] = [tr.step().loss for _ in range(N + M)]
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    from tests.test_executor_pp_harness import RankPool
    pool = RankPool(WORLD)
    try:
        ranks = pool.run(_job, CASES, str(tmp_path_factory.mktemp("reshard")))
    finally:
        pool.close()
    return {"rank0": ranks[0], "ranks": ranks}


@pytest.mark.parametrize("name", list(CASES))
def test_resharded_state_is_the_source_state_exactly(results, name):
    r = results["rank0"][name]
    assert r["full_b"].keys() == r["full_a"].keys()
    for k, v in r["full_a"].items():
        assert torch.equal(r["full_b"][k], v), k                  # the masters B computes with = A's, bit for bit
        assert torch.equal(r["read_a"][k]["param"], v), k         # the reader undoes A's units exactly
    assert r["read_a"].keys() == r["read_b"].keys()
    for k, st in r["read_a"].items():
        assert st.keys() == {"param", "m", "v"}
        for x, t in st.items():
            assert torch.equal(r["read_b"][k][x], t), (k, x)       # moments moved too, bit for bit
        assert st["v"].abs().sum() > 0                            # two Adam steps: real moments, not zeros
    # every rank of B saves exactly the keys (and shapes) the resharded checkpoint holds for it
    union = {}
    for rank in results["ranks"]:
        union.update(rank[name]["keys_b"])
    assert union == r["layout_keys_b"]


@pytest.mark.parametrize("name", list(CASES))
def test_resumed_run_trains_like_the_single_process(results, name):
    got, ref = results["rank0"][name]["losses"], results["rank0"]["reference"]
    assert len(got) == N + M
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a == pytest.approx(b, rel=LOSS_TOL), (i, got, ref)
    assert ref[-1] < ref[0] - 1e-3                                # it trains: a lost update would show


def test_resume_path_reshards_into_a_sibling_directory(results):
    r = results["rank0"][VIA_TRAIN]
    dst = Path(r["dst"])
    assert dst.name.startswith("step_00000002.dp1-tp2-pp1-cp1-z0-") and (dst / ".metadata").exists()
    assert (dst / "loom_spec.json").exists() and (dst.parent / "step_00000002" / "loom_spec.json").exists()


def test_a_model_change_is_refused_naming_the_field(tmp_path):
    from loom.executor.reshard import check_compatible, reshard
    from loom.spec import spec_from_dict
    a = spec_from_dict(_spec({"dp": 2}))
    b = spec_from_dict(_spec({"tp": 2}, model={**MODEL, "hidden": 64, "ffn_hidden": 128}))
    with pytest.raises(ValueError, match=r"model\.hidden = 64 \(the checkpoint's: 32\).*model\.ffn_hidden"):
        reshard(tmp_path / "nothing", a, b, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"training\.optimizer = 'sgd'"):
        check_compatible(a, spec_from_dict(_spec({"tp": 2}, optimizer="sgd")))
    check_compatible(a, spec_from_dict(_spec({"tp": 2}, model={**MODEL, "name": "renamed"})))   # a name is no change


def test_latest_ignores_resharded_copies(tmp_path):
    from loom.executor import checkpoint
    for name in ("step_00000002", "step_00000002.dp1-tp2-pp1-cp1-z0-abcdef01", "step_00000004.x"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / ".metadata").write_bytes(b"")
    assert checkpoint.latest(tmp_path).name == "step_00000002"


def test_the_writer_builds_one_destination_tensor_at_a_time(tmp_path, monkeypatch):
    """One process, no process group: a single-process checkpoint resharded to dp2 ZeRO-1 x tp2 (4 ranks, never
    started) with a global batch of 16 instead of 8. The destination's unit tensors are built as DCP writes them,
    and at most one built tensor (plus the cached padded unit) is alive at any time; the result reads back to the
    source's state bit for bit; the data position carries over and the new batch size reads on from it."""
    import weakref

    from loom.executor import reshard as rs
    from loom.executor.mesh import build_mesh
    from loom.executor.trainer import Trainer
    from loom.spec import spec_from_dict
    src = spec_from_dict(_spec({}))
    tr = Trainer(src, build_mesh(src.plan, "cpu"), torch.device("cpu"), 2)
    tr.step()
    ck = tr.save(tmp_path)
    dst = spec_from_dict(_spec({"dp": 2, "tp": 2, "zero": 1}, global_batch=16))
    alive: list[weakref.ref] = []
    most = [0]
    build = rs._Units.build

    def counting(self, key):
        most[0] = max(most[0], sum(r() is not None for r in alive))
        out = build(self, key)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(rs._Units, "build", counting)
    rs.reshard(ck, src, dst, tmp_path / "dst")
    n_keys = len(rs.layout(dst).keys()) - 5                      # minus step, consumed, loss_scale, opt_t, layout
    assert len(alive) == n_keys and most[0] <= 1
    (a, sa), (b, sb) = rs.read_full(ck, rs.layout(src)), rs.read_full(tmp_path / "dst", rs.layout(dst))
    assert a.keys() == b.keys() and all(torch.equal(a[k][x], b[k][x]) for k in a for x in a[k])
    assert sa == sb and int(sb["consumed"]) == 8 and int(sb["step"]) == int(sb["opt_t"]) == 1
    from loom.executor.data import Batches, TokenData
    data = TokenData(dst.data, MODEL["seq_len"], dst.training.seed, MODEL["vocab"])
    ids, _ = Batches(data, 16, 2, 2, 0, torch.device("cpu")).micro_batches(int(sb["consumed"]))[0]
    assert torch.equal(ids[0], torch.from_numpy(data.sequence(8)[:-1].astype("int64")).to(ids.dtype))
    # turning to fp16 (a GPU precision): the loss scale restarts at fp16's initial 2^16 (it was 1.0: no scaling)
    fp16 = dst.model_copy(update={"training": dst.training.model_copy(update={"precision": "fp16"})})
    rs.reshard(ck, src, fp16, tmp_path / "fp16")
    assert float(sa["loss_scale"]) == 1.0
    assert float(rs.read_full(tmp_path / "fp16", rs.layout(fp16))[1]["loss_scale"]) == 2.0 ** 16


def test_what_needs_resharding():
    """A checkpoint loads as it is when the units and fingerprints are the same (sp, the mesh order and bf16 vs fp32
    change nothing a rank saves); a change of the units (dp even where the padding happens to match, bucket_MB,
    grad_dtype) or a turn to fp16 (its loss scale) goes through reshard."""
    from loom.executor.reshard import same_layout
    from loom.spec import spec_from_dict
    tp2 = spec_from_dict(_spec({"tp": 2}))
    assert same_layout(tp2, spec_from_dict(_spec({"tp": 2, "sp": True})))
    assert same_layout(tp2, spec_from_dict(_spec({"tp": 2}, precision="bf16")))
    assert same_layout(spec_from_dict(_spec({"tp": 2, "dp": 2})),
                       spec_from_dict(_spec({"tp": 2, "dp": 2, "mesh": ["pp", "cp", "tp", "dp"]})))
    fp16 = tp2.model_copy(update={"training": tp2.training.model_copy(update={"precision": "fp16"})})   # a GPU's
    assert not same_layout(tp2, fp16)
    assert not same_layout(tp2, spec_from_dict(_spec({"tp": 2, "bucket_MB": 0.02})))
    assert not same_layout(tp2, spec_from_dict(_spec({"tp": 2}, grad_dtype="bf16")))
    assert not same_layout(spec_from_dict(_spec({})), spec_from_dict(_spec({"dp": 2})))


RUN_SPEC = """
[model]
layers = 2
hidden = 32
heads = 4
kv_heads = 2
ffn_hidden = 64
vocab = 257
seq_len = 16
[cluster]
gpu = "cpu"
gpus_per_node = 2
[training]
global_batch = 8
micro_batch = 2
precision = "{precision}"
lr = 1e-2
[parallel]
{parallel}
[run]
out_dir = "{out}"
checkpoint_every = 2
"""


@pytest.mark.slow
def test_loom_run_resumes_under_another_layout(tmp_path, capfd):
    """`loom run` end to end (torchrun, 2 gloo ranks): 2 steps in dp2 ZeRO-1 fp32, then the spec changed to tp2+SP
    bf16: the run reshards the step-2 checkpoint by itself, says so in one line, and continues at step 3; a model
    change is then refused with the field named."""
    from loom.executor.launch import run_from_cli
    out = tmp_path / "out"
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(RUN_SPEC.format(precision="fp32", parallel="dp = 2\nzero = 1", out=out))
    b.write_text(RUN_SPEC.format(precision="bf16", parallel="tp = 2\nsp = true", out=out))
    assert run_from_cli(str(a), steps=2) == 0
    assert run_from_cli(str(b), steps=4) == 0
    text = capfd.readouterr().out
    lines = [x for x in text.splitlines() if "resharded" in x]
    assert len(lines) == 1 and "(dp 2, tp 1, pp 1, cp 1, zero 1, fp32)" in lines[0] \
        and "(dp 1, tp 2 sp, pp 1, cp 1, zero 0, bf16)" in lines[0], text
    assert "resumed from" in text and "step_00000002.dp1-tp2-pp1-cp1-z0-" in text
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert abs(rows[2]["loss"] - rows[1]["loss"]) < 0.5 * (rows[0]["loss"] - rows[1]["loss"]) + 0.05  # no restart
    # a model change: refused on every rank by resume_path (what the run calls) before anything is loaded
    from loom.executor import checkpoint
    from loom.executor.train import resume_path
    from loom.spec import load_spec
    c = tmp_path / "c.toml"
    c.write_text(RUN_SPEC.format(precision="bf16", parallel="tp = 2", out=out).replace("hidden = 32", "hidden = 64"))
    with pytest.raises(ValueError, match=r"model\.hidden = 64 \(the checkpoint's: 32\)"):
        resume_path(checkpoint.latest(out), load_spec(str(c)))
