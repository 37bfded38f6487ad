"""Elements per second of the counter-based initialiser (executor/init_rng.py) against torch.randn, one thread.

Rows: a whole 4096 × 4096 tensor; a column-parallel shard (rows 1024-2047: one contiguous flat range); a
row-parallel shard (columns 1024-2047 of every row: strided ranges); torch.randn from a seeded Generator (what the
executor drew before, every rank the full tensor) with the same std scaling. The rate is elements over this
process's CPU time (time.process_time: on a shared machine other processes inflate wall time; wall is shown too),
median of `repeats`. The last lines turn the rates into a per-rank init time for Llama 1.5B and 70B parameters:
before, every rank drew all P elements; now a TP rank computes P / tp.

--zero3-unit: one rank's ZeRO-3 build of one Llama 3 70B layer unit (hidden 8192, 64 heads, 8 KV heads, ffn 28672)
at tp 8, dp 32 (TP rank 0, DP rank 0), each way in a fresh subprocess: "tp-shard" (the build before: the rank's
whole TP shard computed on the host, then the unit's DP shard cut from it) against "dp-shard" (the deferred build:
meta parameters, DataParallel computes only the DP shard, executor/dp_unit.py _initial). Per way: elements computed
(init_rng.DRAWN), CPU and wall seconds of model + DataParallel construction, the process's peak RSS growth.

Run: .venv/bin/python benchmarks/init_speed.py [--repeats 5] [--zero3-unit]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from loom.executor.init_rng import DRAWN, normal_block

SHAPE = (4096, 4096)


def rates(rows, repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (elements per CPU second, elements per wall second), medians. The rows take turns within each
    repeat, so that a change in the machine's load touches all of them alike."""
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    wall: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    for i in range(repeats + 1):
        for name, fn, _ in rows:
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            if i:                                   # the first round warms up
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - w0)
    return {name: (k / statistics.median(cpu[name]), k / statistics.median(wall[name])) for name, _, k in rows}


def zero3_unit(way: str, tp: int = 8, dp: int = 32) -> dict:
    """One rank's ZeRO-3 build of a 70B-shaped layer unit (see the module docstring); run in a fresh process."""
    from loom.executor.comm import Group
    from loom.executor.dp import DataParallel
    from loom.executor.model import BuildCtx, Decoder
    from loom.spec import ModelSpec
    m = ModelSpec(layers=80, hidden=8192, heads=64, kv_heads=8, ffn_hidden=28672, vocab=128256, seq_len=8192,
                  rope_theta=500000.0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    DRAWN["elements"] = 0
    c0, w0 = time.process_time(), time.perf_counter()
    g = Group("tp", None, tp, 0)
    dec = Decoder(BuildCtx(m, g, seed=0, params_on_host=way == "dp-shard"), layers=range(1), first=False, last=False)
    dpw = DataParallel(dec, Group("dp", None, dp, 0), g, 3, 25, layer_units=list(dec.layers),
                       param_dtype=torch.bfloat16)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    u = dpw.units[0]
    return {"way": way, "drawn": DRAWN["elements"], "cpu_s": cpu, "wall_s": wall, "unit": u.numel,
            "shard": u.shard_param.numel(), "tp_shard": sum(p.numel() for p in dec.parameters()),
            "peak_rss_MB": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--zero3-unit", action="store_true")
    ap.add_argument("--_way", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args._way:
        print(json.dumps(zero3_unit(args._way)))
        return
    if args.zero3_unit:
        print(f"{platform.node()}  {os.cpu_count()} cpus  torch {torch.__version__}  numpy {np.__version__}  "
              f"1 thread  load {os.getloadavg()[0]:.1f}")
        for way in ("tp-shard", "dp-shard"):
            out = subprocess.run([sys.executable, __file__, "--_way", way], check=True, capture_output=True,
                                 text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"70B layer unit, tp 8, dp 32, {way:8s}: {r['drawn'] / 1e6:8.2f} M elements computed "
                  f"(TP shard {r['tp_shard'] / 1e6:.1f} M, DP shard {r['shard'] / 1e6:.2f} M)  "
                  f"{r['cpu_s']:6.2f} s CPU  {r['wall_s']:6.2f} s wall  peak RSS +{r['peak_rss_MB']:.0f} MB")
        return
    n = SHAPE[0] * SHAPE[1]

    def randn():                                    # a fresh tensor each time, as the init allocates its own
        g = torch.Generator().manual_seed(1234)
        return torch.randn(SHAPE, generator=g).mul_(0.02)

    rows = [("init_rng, whole tensor", lambda: normal_block(0, "w", SHAPE, 0.02), n),
            ("init_rng, column-parallel shard (1/4 rows)", lambda: normal_block(0, "w", SHAPE, 0.02,
                                                                              rows=(1024, 2048)), n // 4),
            ("init_rng, row-parallel shard (1/4 columns)", lambda: normal_block(0, "w", SHAPE, 0.02,
                                                                              cols=(1024, 2048)), n // 4),
            ("torch.randn + mul_ (the former init)", randn, n)]
    print(f"{platform.node()}  {os.cpu_count()} cpus  torch {torch.__version__}  numpy {np.__version__}  "
          f"1 thread  load {os.getloadavg()[0]:.1f}")
    got = rates(rows, args.repeats)
    for name, (c, w) in got.items():
        print(f"{name:45s} {c / 1e6:7.1f} M elements/s CPU   {w / 1e6:7.1f} M/s wall")
    new, old = got["init_rng, whole tensor"][0], got["torch.randn + mul_ (the former init)"][0]
    for label, p in (("1.5B", 1.5e9), ("70B", 70e9)):
        per = "  ".join(f"tp{t}: {p / t / new:6.0f} s" for t in (1, 2, 4, 8))
        print(f"per-rank init of {label} params: before {p / old:6.0f} s at any tp; now {per}")


if __name__ == "__main__":
    main()
