"""loom search: only valid plans that fit, sorted, every plan counted once, fast path vs event simulation,
parallel = "auto" resolution, and the fast path's cost primitives."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loom.spec import SpecError, spec_from_dict
from loom.spec.validate import check
from loom.simulator import simulate_time
from loom.simulator.fast_cost import fast_step
from loom.simulator.memory import memory_report
from loom.simulator.search import _peak, format_search, resolve_auto, search

CASES = {
    "llama3-8b/16": ({"preset": "llama3-8b"}, 2, 64),
    "llama3.2-1b/8": ({"preset": "llama3.2-1b"}, 1, 32),
    "gpt2-350m/16": ({"preset": "gpt2-350m"}, 2, 128),
    "llama3-70b/64": ({"preset": "llama3-70b"}, 8, 128),
}


def make(model: dict, nodes: int, global_batch: int, gpu: str = "H100-SXM", **parallel) -> object:
    return spec_from_dict({"model": model, "cluster": {"gpu": gpu, "nodes": nodes, "price_per_gpu_hour": 2.0},
                           "training": {"global_batch": global_batch}, "parallel": parallel or "auto"})


@pytest.fixture(scope="module")
def results() -> dict:
    return {name: (make(*args), search(make(*args), top_k=8)) for name, args in CASES.items()}


def _spec_of(spec, row):
    t = spec.training.model_copy(update={"micro_batch": row.micro_batch, "recompute": row.recompute})
    return spec.model_copy(update={"parallel": row.plan, "training": t})


def test_rows_are_valid_and_fit(results):
    for name, (spec, res) in results.items():
        assert res.rows, name
        for row in res.rows:
            s = _spec_of(spec, row)
            assert check(s) == [], (name, row.plan)
            mem = memory_report(s)
            assert mem.fits and mem.peak_bytes == row.peak_bytes, (name, row.plan)
            assert row.headroom_bytes == mem.headroom_bytes


def test_ranking_is_sorted(results):
    for name, (_, res) in results.items():
        finalists = [r for r in res.rows if r.event_step_time_s is not None]
        rest = res.rows[len(finalists):]
        assert all(r.event_step_time_s is None for r in rest)
        keys = [r.event_step_time_s for r in finalists]
        assert keys == sorted(keys), name
        fast = [r.step_time_s for r in rest]
        assert fast == sorted(fast), name
        # a non-finalist never beats the fast-path time of the slowest finalist by construction of the shortlist
        if finalists and rest:
            assert min(fast) >= max(r.step_time_s for r in finalists) - 1e-12


def test_rejections_add_up(results):
    for name, (spec, res) in results.items():
        assert res.evaluated + sum(res.rejected.values()) == res.enumerated, name
        assert res.evaluated > 0 and all(n > 0 for n in res.rejected.values())


def test_enumeration_count_is_the_cartesian_space():
    """Independent count of the search space for 8 GPUs and a 16-layer model (llama3.2-1b), from the rules in the
    search module's docstring: every (tp, cp, pp) with tp·cp·pp | 8, sp when tp > 1, the schedules for pp, the
    micro-batches within 32K tokens (seq 8192: 1, 2, 4), ZeRO 0-3 (only 0 when dp = cp = 1), 4 recompute modes
    and the 4 mesh orders."""
    spec = make({"preset": "llama3.2-1b"}, 1, 32)
    res = search(spec)
    divs = [1, 2, 4, 8]
    total = 0
    for tp in divs:
        for cp in divs:
            for pp in divs:
                if 8 % (tp * cp * pp):
                    continue
                dp = 8 // (tp * cp * pp)
                scheds = 1 if pp == 1 else 2 + sum(1 for v in range(2, 16 // pp + 1) if (16 // pp) % v == 0)
                zeros = 4 if dp * cp > 1 else 1
                total += (2 if tp > 1 else 1) * scheds * 3 * zeros * 4 * 4
    assert res.enumerated == total


def test_peak_shortcut_matches_memory_report():
    """search checks memory on the first and last pipeline stage only; the full report agrees."""
    spec = make({"preset": "llama3-70b"}, 8, 128)
    for par in (dict(dp=2, tp=8, pp=4, sp=True, zero=1), dict(dp=1, tp=8, pp=8, schedule="interleaved", vpp=5),
                dict(dp=4, tp=4, pp=4, zero=3, schedule="afab"), dict(dp=2, tp=4, pp=8, cp=1, zero=2)):
        s = spec.with_parallel(**par)
        assert check(s) == []
        assert _peak(s) == memory_report(s).peak_bytes, par
    big = make({"preset": "llama3-405b"}, 64, 512)          # 126 layers: the uneven (Llama 3) split
    for par in (dict(dp=4, tp=8, pp=16, sp=True, zero=1, uneven_split=True),
                dict(dp=4, tp=8, pp=16, sp=True, zero=1, schedule="interleaved", vpp=2, uneven_split=True),
                dict(dp=8, tp=8, pp=8, sp=True, zero=3, schedule="afab", uneven_split=True)):
        s = big.with_parallel(**par)
        assert check(s) == []
        assert _peak(s) == memory_report(s).peak_bytes, par


def test_fast_path_agrees_with_event_simulation_on_winners(results):
    """The fast path's step time of each winner (and the other finalists) within 5 % of simulate_time."""
    checked = 0
    for name, (spec, res) in results.items():
        for row in res.rows:
            if row.event_step_time_s is None:
                continue
            assert row.step_time_s == pytest.approx(row.event_step_time_s, rel=0.05), (name, row.plan)
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("par,training", [
    (dict(dp=2, tp=8, pp=4, sp=True, zero=1), dict(recompute="full")),
    (dict(dp=2, tp=8, pp=4, sp=True, zero=1, schedule="interleaved", vpp=5), {}),
    (dict(dp=16, tp=2, pp=2, zero=0, schedule="afab"), dict(micro_batch=2)),
    (dict(dp=8, tp=4, pp=2, zero=2, mesh=["dp", "pp", "cp", "tp"]), {}),
    (dict(dp=4, tp=4, cp=4, sp=True, zero=1), dict(recompute="none")),
    # ZeRO-2 under PP reduce-scatters every micro-batch (compile_plan), tied embeddings: stage 0's first chunk once
    (dict(dp=4, tp=4, pp=4, zero=2, schedule="interleaved", vpp=2), dict(_tied=True)),
    (dict(dp=4, tp=4, pp=4, zero=2, schedule="afab"), dict(micro_batch=2)),
    (dict(dp=16, tp=2, pp=2, zero=2), dict(micro_batch=1, _tied=True)),
])
def test_fast_path_agrees_with_event_simulation_on_fixed_plans(par, training):
    training = dict(training)
    tied = training.pop("_tied", False)
    spec = spec_from_dict({"model": {"preset": "llama3-70b", "tied_embeddings": tied}, "cluster": {"nodes": 8},
                           "training": {"global_batch": 64, **training}, "parallel": par})
    assert fast_step(spec).step_time_s == pytest.approx(simulate_time(spec).step_time_s, rel=0.05)


def test_fast_path_agrees_on_an_uneven_split():
    """Llama 3 405B's 126 layers on 16 stages, interleaved (first and last virtual stages one layer lighter)."""
    spec = spec_from_dict({"model": {"preset": "llama3-405b"}, "cluster": {"nodes": 64},
                           "training": {"global_batch": 512, "recompute": "full"},
                           "parallel": dict(dp=4, tp=8, pp=16, sp=True, zero=1, schedule="interleaved", vpp=2,
                                            uneven_split=True)})
    assert fast_step(spec).step_time_s == pytest.approx(simulate_time(spec).step_time_s, rel=0.05)


def test_resolve_auto_fills_in_the_best_plan(results):
    spec, res = results["llama3-8b/16"]
    best, again = resolve_auto(spec)
    assert best.parallel != "auto" and check(best) == []
    top = again.rows[0]
    assert best.plan == top.plan and best.training.micro_batch == top.micro_batch
    assert best.training.recompute == top.recompute
    assert memory_report(best).fits


def test_resolve_auto_without_a_fitting_plan_is_a_named_error():
    spec = make({"preset": "llama3-405b"}, 1, 8)
    with pytest.raises(SpecError) as e:
        resolve_auto(spec)
    assert e.value.fields() == ["parallel"]
    assert "memory" in str(e.value)


def test_losers_say_why(results):
    _, res = results["llama3-70b/64"]
    assert res.rows[0].loses_by is None
    for r in res.rows[1:]:
        assert r.loses_by and (r.loses_by == "tie" or " +" in r.loses_by)


def test_bad_arguments_are_named():
    spec = make({"preset": "llama3.2-1b"}, 1, 32)
    with pytest.raises(SpecError) as e:
        search(spec, by="speed")
    assert e.value.fields() == ["by"]
    with pytest.raises(SpecError):
        search(spec, top_k=0)


def test_format_and_json(results):
    _, res = results["llama3-8b/16"]
    text = format_search(res)
    assert "rejected:" in text and "step s (fast)" in text and "step s (event)" in text
    d = json.loads(json.dumps(res.to_dict()))
    assert d["evaluated"] == res.evaluated and len(d["rows"]) == len(res.rows)
    assert d["rows"][0]["plan"]["micro_batch"] == res.rows[0].micro_batch


def test_progress_callback_reaches_the_total():
    seen = []
    search(make({"preset": "llama3.2-1b"}, 1, 32), progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_search_and_budget_do_not_import_torch():
    code = ("import sys; import loom.simulator.search, loom.simulator.budget, loom.spec.export; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_per_op_recompute_is_searched_but_never_with_context_parallel():
    """recompute = "op" is a candidate; with cp > 1 it is rejected for its stated reason (spec/validate.py refuses
    it there), so no row the search returns is a spec `loom run` would refuse."""
    from loom.simulator.search import OP_CP_REASON
    res = search(make({"preset": "llama3.2-1b"}, 1, 32), top_k=400)
    assert res.rejected.get(OP_CP_REASON, 0) > 0
    assert any(r.recompute == "op" for r in res.rows)
    assert not any(r.recompute == "op" and r.plan.cp > 1 for r in res.rows)
