"""How fast `loom search` is, and how closely its fast path tracks the event simulator.

1. The full search for Llama 3 70B on 1,024 H100 (128 nodes × 8) with a global batch of 1,024 × 8,192 tokens:
   wall and CPU time (this process's, `time.process_time`: on a shared machine other processes inflate wall
   time), plans enumerated / evaluated, the winner. Target: < 10 s on the 2-core development machine.
2. The fast path alone (`fast_cost.fast_step`) on every plan that search priced, with its memo tables cleared
   first (cold) and again (warm). Target: ≥ 10,000 plans/s.
3. Fast path vs `simulate_time` on random valid plans of four models (8 to 128 GPUs): the error distribution,
   overall and per family (ZeRO stage × PP × CP).
4. With --families N: N draws of each comm-stream family of tests/test_fast_cost_families.py (its sampler and
   bounds; seeded apart from the tests' draws), the largest error against the family's bound.

Run: .venv/bin/python benchmarks/search_speed.py [--samples N] [--seed S] [--families N] [--json]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from loom.spec import spec_from_dict
from loom.spec.validate import check
from loom.simulator import simulate_time
from loom.simulator import fast_cost
from loom.simulator.search import format_search, search


def target_spec():
    return spec_from_dict({"model": {"preset": "llama3-70b"},
                           "cluster": {"gpu": "H100-SXM", "gpus_per_node": 8, "nodes": 128,
                                       "price_per_gpu_hour": 2.0},
                           "training": {"global_batch": 1024}, "parallel": "auto"})


def full_search() -> dict:
    spec = target_spec()
    fast_cost._CTX.__init__()                      # cold memo tables, as in a fresh process
    w0, c0 = time.perf_counter(), time.process_time()
    res = search(spec, top_k=10)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    best = res.rows[0]
    return {"wall_s": wall, "cpu_s": cpu, "enumerated": res.enumerated, "evaluated": res.evaluated,
            "rejected": res.rejected, "phase_s": res.seconds, "event_simulated": res.event_simulated,
            "best": best.to_dict(), "table": format_search(res)}


def fast_path_rate() -> dict:
    """fast_step over every plan the full search priced (collected by re-running its loop's inputs)."""
    import loom.simulator.search as S
    specs = []
    real = S.fast_step

    def collect(s):
        specs.append(s)
        return real(s)
    S.fast_step = collect
    try:
        search(target_spec(), top_k=1, event_top=0)
    finally:
        S.fast_step = real
    out = {"plans": len(specs)}
    for label in ("cold", "warm"):
        if label == "cold":
            fast_cost._CTX.__init__()
        c0 = time.process_time()
        for s in specs:
            fast_cost.fast_step(s)
        cpu = time.process_time() - c0
        out[f"{label}_plans_per_s"] = len(specs) / cpu
    return out


def agreement(samples: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    models = [("llama3-8b", [1, 2, 4]), ("llama3.2-1b", [1, 2]), ("gpt2-350m", [1, 2]), ("llama3-70b", [4, 8, 16])]
    meshes = [["pp", "dp", "cp", "tp"], ["dp", "pp", "cp", "tp"], ["pp", "dp", "tp", "cp"], ["pp", "cp", "tp", "dp"]]
    errors, fams = [], {}
    while len(errors) < samples:
        name, nodes_opts = rng.choice(models)
        nodes = rng.choice(nodes_opts)
        world = 8 * nodes
        tp, cp, pp = rng.choice([1, 2, 4, 8]), rng.choice([1, 1, 2, 4]), rng.choice([1, 1, 2, 4, 8])
        if world % (tp * cp * pp):
            continue
        dp = world // (tp * cp * pp)
        mb = rng.choice([1, 2, 4])
        sched = rng.choice(["1f1b", "afab", "interleaved"])
        par = dict(dp=dp, tp=tp, pp=pp, cp=cp, sp=tp > 1 and rng.random() < 0.7, zero=rng.choice([0, 1, 2, 3]),
                   schedule=sched, vpp=rng.choice([2, 4]) if sched == "interleaved" else 1, mesh=rng.choice(meshes))
        data = {"model": {"preset": name}, "cluster": {"gpu": rng.choice(["H100-SXM", "A100-80GB"]), "nodes": nodes},
                "training": {"global_batch": dp * mb * rng.choice([1, 2, 4, 8, 16]), "micro_batch": mb,
                             "recompute": rng.choice(["none", "selective", "full"])}, "parallel": par}
        try:
            spec = spec_from_dict(data)
        except Exception:          # invalid combination: draw again
            continue
        assert check(spec) == []
        e = simulate_time(spec).step_time_s
        f = fast_cost.fast_step(spec).step_time_s
        errors.append(f / e - 1)
        fam = f"zero{par['zero']} {'PP' if pp > 1 else 'no PP'} {'CP' if cp > 1 else 'no CP'}"
        fams.setdefault(fam, []).append(f / e - 1)
    return {"samples": samples, "seed": seed, **_stats(errors),
            "families": {k: {"n": len(v), **_stats(v)} for k, v in sorted(fams.items())}}


def _stats(errors: list[float]) -> dict:
    absolute = sorted(abs(x) for x in errors)
    n = len(absolute)
    return {"median_abs": statistics.median(absolute), "p90_abs": absolute[int(0.9 * (n - 1))],
            "max_abs": absolute[-1], "min": min(errors), "max": max(errors),
            "within_5pct": sum(1 for x in absolute if x <= 0.05) / n}


def families(draws: int) -> dict:
    """The comm-stream families of tests/test_fast_cost_families.py, `draws` plans each."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import test_fast_cost_families as fam_tests
    out = {}
    for name, (zeros, pps, cps, scheds, batches, bound) in fam_tests.FAMILIES.items():
        rng = random.Random(f"{name}/measure")
        errs = []
        for _ in range(draws):
            spec = spec_from_dict(fam_tests.draw(rng, zeros, pps, cps, scheds, batches))
            errs.append(fast_cost.fast_step(spec).step_time_s / simulate_time(spec).step_time_s - 1)
        out[name] = {"n": draws, "bound": bound, **_stats(errs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", type=int, default=0, help="draws per comm-stream family (0: skip)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "search": full_search(), "fast_path": fast_path_rate(),
              "agreement": agreement(args.samples, args.seed)}
    if args.families:
        report["families"] = families(args.families)
    if args.json:
        report["search"].pop("table")
        print(json.dumps(report, indent=2))
        return
    s, f, a = report["search"], report["fast_path"], report["agreement"]
    print(s["table"])
    print(f"\nfull search: {s['wall_s']:.2f} s wall, {s['cpu_s']:.2f} s CPU (target < 10 s); "
          f"{s['enumerated']:,} plans, {s['evaluated']:,} priced; phases {s['phase_s']}")
    print(f"fast path: {f['plans']:,} plans, {f['cold_plans_per_s']:,.0f} plans/s cold, "
          f"{f['warm_plans_per_s']:,.0f} warm (CPU time; target ≥ 10,000)")
    print(f"fast vs event on {a['samples']} random plans (seed {a['seed']}): median |err| {a['median_abs']:.2%}, "
          f"p90 {a['p90_abs']:.2%}, max {a['max_abs']:.2%}, {a['within_5pct']:.0%} within 5 %")
    for name, st in a["families"].items():
        print(f"  {name:20s} n={st['n']:4d}  median {st['median_abs']:.2%}  max |err| {st['max_abs']:.2%} "
              f"({st['min']:+.2%} .. {st['max']:+.2%})")
    for name, st in report.get("families", {}).items():
        print(f"family {name:36s} n={st['n']}  median {st['median_abs']:.2%}  p90 {st['p90_abs']:.2%}  "
              f"max {st['max_abs']:.2%} (bound {st['bound']:.1%})")


if __name__ == "__main__":
    main()
