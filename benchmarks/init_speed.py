"""Elements per second of the counter-based initialiser (executor/init_rng.py) against torch.randn, one thread.

Rows: a whole 4096 × 4096 tensor; a column-parallel shard (rows 1024-2047: one contiguous flat range); a
row-parallel shard (columns 1024-2047 of every row: strided ranges); torch.randn from a seeded Generator (what the
executor drew before, every rank the full tensor) with the same std scaling. The rate is elements over this
process's CPU time (time.process_time: on a shared machine other processes inflate wall time; wall is shown too),
median of `repeats`. The last lines turn the rates into a per-rank init time for Llama 1.5B and 70B parameters:
before, every rank drew all P elements; now a TP rank computes P / tp.

Run: .venv/bin/python benchmarks/init_speed.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch

from loom.executor.init_rng import normal_block

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
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
