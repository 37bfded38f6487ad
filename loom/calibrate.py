"""`loom calibrate [--out profile.json] [--seconds 60]`: measure this machine and write a hardware profile.

The profile holds `loom.simulator.hardware.HardwareProfile` fields (read with `HardwareProfile.load`, passed to
`loom verify --profile` or `simulate_time(..., profile=)`), plus a "meta" object: device, date, torch version,
backend, and the raw fits (every collective's α and β per group size, every measured shape).

What is measured (each part gets a share of the time budget and stops when it is spent):
- GEMM: achieved FLOP/s of `a @ b` over a grid of (M, N, K); efficiency = achieved / catalog peak, fitted to the
  simulator's curve e(x) = e_max·x/(x + x_half), x = min(M, N, K) (hardware.py). The fit is linear in 1/x:
  1/e = 1/e_max + (x_half/e_max)·(1/x) (a Lineweaver-Burk fit; `fit_saturation`). If e_max > 1 (the catalog
  peak is below what this machine does, as for the "cpu" placeholder) the peak is raised to the best fit and e_max
  set to 1.
- Attention: forward + backward of the executor's attention op (`loom.executor.ops.attention`, causal) over
  sequence lengths and head dims; FLOPs in the simulator's convention (causal forward 2·s·q_dim per token, backward
  2× forward: spec/compile.py), fitted to attn_eff_max·s/(s + s_half)·d/(d + d_half) (`fit_attention`: grid over
  the two half-saturation constants, closed-form least squares for the cap).
- Memory-bound bandwidth: a large device copy (read + write bytes / time): hbm_GBps, hbm_efficiency = 1.
- Per-layer fixed cost: forward + backward of one tiny executor layer, where launch and framework overhead dominate
  the arithmetic, halved: compute_overhead_s (the simulator adds it per layer to the forward and to the backward).
- Collectives: all-reduce, all-gather, reduce-scatter and send/recv on the backend in use (gloo on CPU, NCCL on
  GPUs) over groups of 2..N spawned ranks and message sizes 4 KiB..4 MiB; each (collective, group size) fitted to
  the simulator's α-β form t = α·steps + wire_bytes / B (Hockney 1994; steps and ring wire bytes as in
  simulator/costs.py and spec/compile.py) by least squares (`fit_alpha_beta`). The profile's intra-node bandwidth
  is the all-reduce's B at the largest group (comm_efficiency = 1: B is already what is achieved) and its latency
  the all-reduce's α.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import sys
import time
from typing import Callable

from loom.calibrate_fit import collective_steps, fit_alpha_beta, fit_attention, fit_saturation, wire_bytes

# ---- measurements --------------------------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float, progress: Callable[[str, float], None] | None = None):
        self.t0, self.seconds, self.progress = time.perf_counter(), seconds, progress

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def tick(self, label: str) -> None:
        if self.progress:
            self.progress(label, min(1.0, (time.perf_counter() - self.t0) / self.seconds))


def _timeit(fn: Callable[[], None], sync: Callable[[], None], min_s: float = 0.05, max_reps: int = 50) -> float:
    """Median-free mean time of fn after one warm-up call, over enough repetitions to span min_s."""
    fn()
    sync()
    reps, t0 = 0, time.perf_counter()
    while reps < max_reps and (reps < 3 or time.perf_counter() - t0 < min_s):
        fn()
        reps += 1
    sync()
    return (time.perf_counter() - t0) / reps


def _timeit_fixed(fn: Callable[[], None], sync: Callable[[], None], reps: int, best: bool = False) -> float:
    """Median (or, with `best`, minimum: interference from other processes only adds time) of `reps` calls after
    one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times) if best else sorted(times)[len(times) // 2]


def _device():
    import torch
    if torch.cuda.is_available():
        dev = torch.device("cuda", 0)
        return dev, torch.bfloat16, "bf16", lambda: torch.cuda.synchronize(dev)
    return torch.device("cpu"), torch.float32, "fp32", lambda: None


def measure_gemm(budget: Budget, share_s: float, peak: float) -> list[dict]:
    import torch
    dev, dtype, _, sync = _device()
    sizes = [64, 128, 256, 512, 1024, 2048, 4096] if dev.type == "cuda" else [32, 64, 128, 256, 512, 1024]
    shapes = [(m, n, k) for m in sizes for n, k in ((sizes[-1] // 2, sizes[-1] // 2), (m, m))]
    shapes = list(dict.fromkeys(shapes))
    best: dict[tuple[int, int, int], float] = {}
    end = time.perf_counter() + share_s
    while time.perf_counter() < end and budget.left() > 0:     # passes over the grid; keep each shape's best
        for m, n, k in shapes:
            if time.perf_counter() > end or budget.left() <= 0:
                break
            a = torch.randn(m, k, device=dev, dtype=dtype)
            b = torch.randn(k, n, device=dev, dtype=dtype)
            t = _timeit(lambda: a @ b, sync)
            best[(m, n, k)] = min(t, best.get((m, n, k), math.inf))
            budget.tick("gemm")
    return [{"m": m, "n": n, "k": k, "time_s": t, "flops_per_s": 2.0 * m * n * k / t,
             "efficiency": 2.0 * m * n * k / t / peak} for (m, n, k), t in best.items()]


def measure_attention(budget: Budget, share_s: float, peak: float) -> list[dict]:
    import torch
    from loom.executor import ops
    dev, dtype, _, sync = _device()
    seqs = [256, 512, 1024, 2048, 4096] if dev.type == "cuda" else [64, 128, 256, 512]
    dims = [64, 128] if dev.type == "cuda" else [32, 64]
    heads = 16 if dev.type == "cuda" else 4
    best: dict[tuple[int, int], float] = {}
    end = time.perf_counter() + share_s
    while time.perf_counter() < end and budget.left() > 0:
        for d in dims:
            for s in seqs:
                if time.perf_counter() > end or budget.left() <= 0:
                    break
                q, k, v = (torch.randn(1, heads, s, d, device=dev, dtype=dtype, requires_grad=True)
                           for _ in range(3))
                g = torch.randn(1, heads, s, d, device=dev, dtype=dtype)

                def step():
                    o = ops.attention(q, k, v, causal=True)
                    o.backward(g)
                best[(s, d)] = min(_timeit(step, sync), best.get((s, d), math.inf))
                budget.tick("attention")
    out = []
    for (s, d), t in best.items():
        flops = 3 * 2.0 * s * s * heads * d          # causal fwd 2·s·q_dim per token × s tokens; bwd 2× fwd
        out.append({"seq": s, "head_dim": d, "time_s": t, "flops_per_s": flops / t, "efficiency": flops / t / peak})
    return out


def measure_bandwidth(budget: Budget) -> dict:
    import torch
    dev, _, _, sync = _device()
    n = 256 * 2**20                                      # far beyond any last-level cache
    x = torch.empty(n, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    t = _timeit(lambda: y.copy_(x), sync, min_s=0.2)
    budget.tick("bandwidth")
    return {"bytes": 2 * n, "time_s": t, "GBps": 2 * n / t / 1e9}


def measure_layer_overhead(budget: Budget) -> dict:
    """Forward and backward time of one executor layer at a size where the arithmetic is negligible. The simulator
    charges compute_overhead_s once per layer to the forward and once to the backward, so the constant is half the
    forward-plus-backward time: the two ops' overheads then add up to what this machine spends."""
    import torch
    from loom.executor.model import BuildCtx, Block
    from loom.spec.model import ModelSpec
    dev, dtype, _, sync = _device()
    m = ModelSpec(layers=1, hidden=32, heads=2, kv_heads=2, ffn_hidden=64, vocab=64, seq_len=8)
    block = Block(BuildCtx(m, device=dev), 0).to(dev, dtype)     # a bare Block is built on the host
    from loom.executor import ops
    cos, sin = ops.rope_tables(m.seq_len, m.d_head, m.rope_theta, dev)
    x = torch.randn(m.seq_len, 1, m.hidden, device=dev, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        fwd = _timeit_fixed(lambda: block(x, (cos, sin)), sync, reps=21, best=True)
    both = _timeit_fixed(lambda: block(x, (cos, sin)).sum().backward(), sync, reps=21, best=True)
    budget.tick("overhead")
    return {"layer_forward_s": fwd, "layer_forward_backward_s": both, "per_compute_op_s": both / 2}


def _comm_worker(rank: int, world: int, port: int, sizes: list[int], share_s: float, q) -> None:
    import datetime as dt

    import torch
    import torch.distributed as dist
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    backend = "nccl" if cuda else "gloo"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=dt.timedelta(seconds=60))
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    # torch >= 2.10 names (the old ones warn), as executor/comm.py picks them
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    results = []
    ns = [n for n in (2, 4, 8, 16) if n <= world]
    groups = {n: dist.new_group(list(range(n))) for n in ns}
    stop = torch.zeros(1, device=dev)
    best: dict[tuple[str, int, int], float] = {}
    done, first = False, True
    deadline = time.time() + share_s                 # from here: starting the ranks is not part of the share
    while not done:          # one full sweep, then more until the deadline; each point keeps its best time
        for n in ns:
            g = groups[n]
            for kind in ("all_reduce", "all_gather", "reduce_scatter", "send"):
                for nbytes in sizes:
                    stop.zero_()
                    if time.time() > deadline and not first:
                        stop.fill_(1)
                    dist.all_reduce(stop)                   # every rank agrees to stop or go on
                    if stop.item() > 0:
                        done = True
                        break
                    if rank >= n or (kind == "send" and rank >= 2):
                        dist.barrier()
                        continue
                    t = _time_collective(kind, nbytes, n, g, rank, dev, sync, all_gather, reduce_scatter)
                    key = (kind, 2 if kind == "send" else n, nbytes)
                    best[key] = min(t, best.get(key, math.inf))
                    dist.barrier()
                if done:
                    break
            if done:
                break
        first = False
    results = [{"kind": k, "group": n, "bytes": b, "time_s": t} for (k, n, b), t in best.items()]
    if rank == 0:
        q.put({"backend": backend, "world": world, "results": results})
    dist.destroy_process_group()


def _time_collective(kind: str, nbytes: int, n: int, g, rank: int, dev, sync, all_gather, reduce_scatter) -> float:
    import torch
    import torch.distributed as dist
    numel = nbytes // 4
    buf = torch.ones(numel, device=dev)
    out = torch.empty(numel, device=dev)
    shard = torch.empty(numel // n, device=dev)
    part = torch.ones(numel // n, device=dev)
    if kind == "all_reduce":
        fn = lambda: dist.all_reduce(buf, group=g)                      # noqa: E731
    elif kind == "all_gather":
        fn = lambda: all_gather(out, part, group=g)                      # noqa: E731
    elif kind == "reduce_scatter":
        fn = lambda: reduce_scatter(shard, buf, group=g)                 # noqa: E731
    else:
        def fn():
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            elif rank == 1:
                dist.recv(buf, 0)
                dist.send(buf, 0)
    t = _timeit_fixed(fn, sync, reps=5)              # the same count on every rank: collectives must match
    return t / 2 if kind == "send" else t            # a round trip is two one-way messages


def measure_collectives(budget: Budget, share_s: float, world: int | None = None) -> dict:
    import socket

    import torch
    import torch.multiprocessing as mp
    if world is None:
        world = torch.cuda.device_count() if torch.cuda.is_available() else min(4, max(2, os.cpu_count() or 2))
    if world < 2:
        return {"backend": "none", "world": world, "results": [], "skipped": "one device: no collectives"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # 4 KiB .. 4 MiB on gloo; up to 256 MiB on NCCL, where NVLink bandwidth only saturates at large messages
    sizes = [4096 * 4 ** i for i in range(9 if torch.cuda.is_available() and world > 1 else 6)]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_comm_worker, args=(r, world, port, sizes, share_s, q), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        res = q.get(timeout=share_s + 90)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    budget.tick("collectives")
    return res


def fit_collectives(results: list[dict]) -> list[dict]:
    """One α-β fit per (collective, group size) with at least two message sizes."""
    by: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        by.setdefault((r["kind"], r["group"]), []).append(r)
    fits = []
    for (kind, n), rows in sorted(by.items()):
        if len({r["bytes"] for r in rows}) < 2:
            continue
        steps = collective_steps(kind, n)
        ab = fit_alpha_beta([wire_bytes(kind, n, r["bytes"]) for r in rows], [r["time_s"] for r in rows], steps)
        fits.append({"kind": kind, "group": n, "alpha_s": ab.alpha_s, "beta_GBps": ab.beta_Bps / 1e9,
                     "steps": steps, "points": ab.points})
    return fits


# ---- the profile -------------------------------------------------------------------------------------------------
def catalog_name(device_name: str, total_memory: int) -> str:
    """The catalog GPU whose datasheet peaks the efficiencies are relative to (A100: by memory size)."""
    for key, name in (("H200", "H200"), ("B200", "B200"), ("H100", "H100-SXM")):
        if key in device_name:
            return name
    if "A100" in device_name:
        return "A100-80GB" if total_memory > 50 * 2**30 else "A100-40GB"
    return "H100-SXM"          # unknown: efficiencies relative to H100's peaks (stated in meta["gpu"])


def calibrate(seconds: float = 60.0, progress: Callable[[str, float], None] | None = None,
              comm_world: int | None = None) -> tuple[dict, dict]:
    """(profile fields, meta) measured on this machine within about `seconds`."""
    import torch

    from loom.simulator.hardware import HardwareProfile
    from loom.spec.gpus import lookup
    budget = Budget(seconds, progress)
    dev, _, prec, _ = _device()
    threads = None
    if dev.type == "cpu":
        # The CPU target's "GPU" is one rank; loom run gives each rank cpu_count // gpus_per_node threads
        # (executor/launch.py). Measure with that many: LOOM_CALIBRATE_THREADS, default 1.
        threads = int(os.environ.get("LOOM_CALIBRATE_THREADS", "1"))
        torch.set_num_threads(threads)
    name = "cpu"
    if dev.type == "cuda":
        name = catalog_name(torch.cuda.get_device_name(dev), torch.cuda.get_device_properties(dev).total_memory)
    base = HardwareProfile.from_gpu(lookup(name))
    peak = base.peak(prec)
    fields: dict = {"name": name}
    meta: dict = {"gpu": name, "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
                  "host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                  "python": platform.python_version(),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "precision": prec, "seconds_budget": seconds, "threads_per_rank": threads}
    gemm = measure_gemm(budget, 0.25 * seconds, peak)
    if len(gemm) >= 2:
        e_max, half = fit_saturation([min(r["m"], r["n"], r["k"]) for r in gemm], [r["efficiency"] for r in gemm])
        if e_max > 1.0:                                 # the catalog peak is a placeholder below reality
            peak *= e_max
            for r in gemm:
                r["efficiency"] /= e_max
            e_max = 1.0
        fields.update(peak_flops={**base.peak_flops, prec: peak}, gemm_eff_max=e_max, gemm_half_dim=half)
    attn = measure_attention(budget, 0.2 * seconds, peak)
    if len(attn) >= 3:
        a_max, s_half, d_half = fit_attention([r["seq"] for r in attn], [r["head_dim"] for r in attn],
                                              [r["flops_per_s"] / peak for r in attn])
        fields.update(attn_eff_max=a_max, attn_half_seq=s_half, attn_half_dim=d_half)
    bw = measure_bandwidth(budget)
    fields.update(hbm_GBps=bw["GBps"], hbm_efficiency=1.0)
    over = measure_layer_overhead(budget)
    fields["compute_overhead_s"] = over["per_compute_op_s"]
    comm = measure_collectives(budget, max(1.0, budget.left() - 5.0))    # ~5 s to start and stop the ranks
    fits = fit_collectives(comm.get("results", []))
    ar = [f for f in fits if f["kind"] == "all_reduce"]
    if ar:
        big = max(ar, key=lambda f: f["group"])
        fields.update(intra_node_GBps=big["beta_GBps"], intra_node_latency_s=big["alpha_s"], comm_efficiency=1.0)
    meta.update(gemm=gemm, attention=attn, bandwidth=bw, layer_overhead=over,
                collectives={"backend": comm.get("backend"), "world": comm.get("world"), "fits": fits,
                             "raw": comm.get("results", [])},
                elapsed_s=round(seconds - budget.left(), 2))
    return fields, meta


def _bar(label: str, frac: float) -> None:
    width = 30
    filled = int(width * frac)
    print(f"\rcalibrate [{'#' * filled}{'.' * (width - filled)}] {100 * frac:3.0f}% {label:<12}", end="",
          file=sys.stderr, flush=True)


def calibrate_cli(args) -> int:
    if args.seconds <= 0:
        print("loom calibrate: --seconds must be positive", file=sys.stderr)
        return 2
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        print(f"loom calibrate: --out {args.out}: the directory {parent} does not exist or is not writable",
              file=sys.stderr)
        return 2
    fields, meta = calibrate(args.seconds, _bar if sys.stderr.isatty() else None)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    profile = _resolve(fields)
    profile.save(args.out, meta)
    print(f"loom calibrate: wrote {args.out} ({meta['device']}, torch {meta['torch']}, {meta['elapsed_s']} s): "
          f"GEMM cap {profile.gemm_eff_max:.2f} of {profile.peak_flops[meta['precision']] / 1e12:.3g} TFLOP/s, "
          f"copy {profile.hbm_GBps:.1f} GB/s, link {profile.intra_node_GBps:.2f} GB/s α "
          f"{profile.intra_node_latency_s * 1e6:.0f} µs, layer overhead {profile.compute_overhead_s * 1e6:.0f} µs")
    return 0


def _resolve(fields: dict):
    from loom.simulator.hardware import HardwareProfile
    from loom.spec.gpus import lookup
    return HardwareProfile.resolve(lookup(fields["name"]), {k: v for k, v in fields.items()})
