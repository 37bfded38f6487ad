"""Loom's executor vs a plain-PyTorch training loop of the same Llama 1.5B model on one GPU.

Model (Loom's Llama 1.5B example): hidden 2048, 16 layers, 32 query / 8 KV heads, ffn 8192, vocab 128256,
seq 4096, micro-batch 2, AdamW, no recompute. Loom runs Megatron's bf16 layout (bf16 parameters and residual,
fp32 masters in the optimizer: executor/dp.py); the plain loop is torch AMP (fp32 parameters, bf16 autocast), what
a PyTorch user writes first. Both runs train on the same token batches (the byte-level stdlib corpus). Reported per run: tokens/s, MFU (ModelSpec.model_flops_per_token,
the PaLM convention: 6·N + 12·L·q_dim·s, against the catalog's dense bf16 peak) and peak allocated memory.

  python benchmarks/train_gpu.py                 # the 1.5B comparison (needs CUDA; ~2 min)
  python benchmarks/train_gpu.py --loom-recompute none,selective --json out.json   # two Loom runs, results saved
  python benchmarks/train_gpu.py --cpu-smoke     # a tiny bf16 version on CPU (checks the script, not speed)
Without CUDA and without --cpu-smoke it says so and exits 0. The table is the last thing printed; its "target"
column holds issue 5's goal for the Loom runs: MFU >= 60 % within 33 GB of peak allocated memory.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

from loom.spec import spec_from_dict

LLAMA_1B5 = dict(name="llama-1.5b", layers=16, hidden=2048, heads=32, kv_heads=8, ffn_hidden=8192, vocab=128256,
                 seq_len=4096, rope_theta=500000.0)
TINY = dict(name="tiny", layers=2, hidden=64, heads=4, kv_heads=2, ffn_hidden=160, vocab=257, seq_len=64,
            rope_theta=10000.0)


def catalog_gpu(name: str) -> str:
    for key, entry in (("H200", "H200"), ("H100", "H100-SXM"), ("B200", "B200"), ("A100", "A100-80GB")):
        if key in name:
            return entry
    return "H100-SXM"


TARGET_MFU, TARGET_GIB = 0.60, 33.0 * 1e9 / 2**30      # issue 5: >= 60 % MFU within 33 GB


def make_spec(model: dict, gpu: str, precision: str, micro_batch: int, recompute: str = "none"):
    return spec_from_dict({"model": model, "cluster": {"gpu": gpu, "gpus_per_node": 1},
                           "training": {"global_batch": micro_batch, "micro_batch": micro_batch,
                                        "precision": precision, "recompute": recompute, "lr": 3e-4,
                                        "lr_schedule": "constant", "grad_clip": 1.0},
                           "parallel": {"dp": 1}})


# ---- the plain-PyTorch baseline -------------------------------------------------------------------------------
class PlainBlock(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m
        self.n1, self.n2 = nn.RMSNorm(m.hidden, eps=m.norm_eps), nn.RMSNorm(m.hidden, eps=m.norm_eps)
        self.qkv = nn.Linear(m.hidden, m.q_dim + 2 * m.kv_dim, bias=False)
        self.o = nn.Linear(m.q_dim, m.hidden, bias=False)
        self.gate_up = nn.Linear(m.hidden, 2 * m.ffn_hidden, bias=False)
        self.down = nn.Linear(m.ffn_hidden, m.hidden, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        m = self.m
        q, k, v = self.qkv(self.n1(x)).split([m.q_dim, m.kv_dim, m.kv_dim], dim=-1)
        q = q.view(b, s, m.heads, m.d_head).transpose(1, 2)
        k = k.view(b, s, m.n_kv_heads, m.d_head).transpose(1, 2)
        v = v.view(b, s, m.n_kv_heads, m.d_head).transpose(1, 2)
        rot = lambda t: torch.cat((-t[..., t.shape[-1] // 2:], t[..., : t.shape[-1] // 2]), -1)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, m.q_dim))
        g, u = self.gate_up(self.n2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class PlainLlama(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m
        self.embed = nn.Embedding(m.vocab, m.hidden)
        self.blocks = nn.ModuleList(PlainBlock(m) for _ in range(m.layers))
        self.norm = nn.RMSNorm(m.hidden, eps=m.norm_eps)
        self.head = nn.Linear(m.hidden, m.vocab, bias=False)
        inv = 1.0 / (m.rope_theta ** (torch.arange(0, m.d_head, 2).float() / m.d_head))
        ang = torch.outer(torch.arange(m.seq_len).float(), inv).repeat(1, 2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, ids, tgt):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x, self.cos, self.sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tgt.reshape(-1))


def run_plain(spec, batches, steps: int, warmup: int, device) -> dict:
    torch.manual_seed(0)
    model = PlainLlama(spec.model).to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.training.precision == "bf16")
    times, losses = [], []
    for i in range(warmup + steps):
        if i == warmup and device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ids, tgt = batches[i % len(batches)]
        with amp:
            loss = model(ids, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    del model, opt
    return {"step_s": sorted(times)[len(times) // 2], "mem": mem, "loss0": losses[0], "loss": losses[-1]}


def run_loom(spec, steps: int, warmup: int, device) -> tuple[dict, list]:
    from loom.executor.mesh import build_mesh
    from loom.executor.trainer import Trainer
    tr = Trainer(spec, build_mesh(spec.plan, device.type), device, warmup + steps)
    times, losses, mems = [], [], []
    for i in range(warmup + steps):
        s = tr.step()
        losses.append(s.loss)
        if i >= warmup:
            times.append(s.time_s)
            mems.append(s.mem_bytes)
    del tr
    return {"step_s": sorted(times)[len(times) // 2], "mem": max(mems) if device.type == "cuda" else 0,
            "loss0": losses[0], "loss": losses[-1]}


def token_batches(spec, n: int, device) -> list:
    """The first micro-batch of each of n steps, as the Trainer draws them (executor/trainer.py: Batches over
    TokenData, one DP rank), for the plain baseline."""
    from loom.executor.data import Batches, TokenData
    m, t = spec.model, spec.training
    data = Batches(TokenData(spec.data, m.seq_len, t.seed, m.vocab), t.global_batch, t.micro_batch, 1, 0, device)
    return [data.micro_batches(k * t.global_batch)[0] for k in range(n)]


def guarded(name: str, fn, device) -> dict | str:
    """fn()'s result, or the error's last line (full traceback on stderr): one failing run (an OOM, a kernel that
    does not compile) must not cost the other runs of a one-shot GPU session."""
    try:
        return fn()
    except Exception as exc:                                  # noqa: BLE001 - reported in the table
        traceback.print_exc()
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny bf16 model on CPU (CPU autocast)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--loom-recompute", default="none",
                    help="comma-separated recompute modes, one Loom run each (none, selective, op, full)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.loom_recompute.split(",") if m.strip()]
    if args.cpu_smoke:
        torch.set_num_threads(1)        # a loaded 2-core machine makes multi-threaded tiny matmuls spin-wait
        device, model, gpu, prec, mb = torch.device("cpu"), TINY, "cpu", "bf16", 2
        steps, warmup = args.steps or 3, args.warmup or 1
    else:
        if not torch.cuda.is_available():
            print("train_gpu: no CUDA device here; nothing to measure. Run it on a GPU machine, or pass --cpu-smoke "
                  "to check the script on a tiny CPU model.")
            return 0
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        model, gpu, prec, mb = LLAMA_1B5, catalog_gpu(torch.cuda.get_device_name()), "bf16", 2
        steps, warmup = args.steps or 10, args.warmup or 3
    spec = make_spec(model, gpu, prec, mb)
    peak = spec.gpu.peak_flops[prec] if device.type == "cuda" else spec.gpu.peak_flops["fp32"]
    tokens = spec.tokens_per_step
    flops = spec.model.model_flops_per_token() * tokens

    runs = []
    for mode in modes:                      # the same batches for every run (the data order is the spec's)
        runs.append((f"loom executor ({mode})", guarded(mode, lambda: run_loom(make_spec(model, gpu, prec, mb, mode),
                                                                               steps, warmup, device), device)))
    runs.append(("plain PyTorch", guarded("plain", lambda: run_plain(spec, token_batches(spec, warmup + steps, device),
                                                                     steps, warmup, device), device)))

    rows, results = [], []
    for name, r in runs:
        if isinstance(r, str):
            rows.append([name, r, "", "", "", "", "failed" if name.startswith("loom") else ""])
            results.append({"run": name, "error": r})
            continue
        mfu = flops / (r["step_s"] * peak)
        ok = mfu >= TARGET_MFU and 0 < r["mem"] <= TARGET_GIB * 2**30
        rows.append([name, f"{tokens / r['step_s']:,.0f}", f"{100 * mfu:.1f}",
                     f"{r['mem'] / 2**30:.1f}" if r["mem"] else "n/a", f"{r['step_s'] * 1e3:.0f}",
                     f"{r['loss0']:.3f} -> {r['loss']:.3f}",
                     ("met" if ok else "missed") if name.startswith("loom") else ""])
        results.append({"run": name, "tokens_per_s": tokens / r["step_s"], "mfu": mfu, "peak_bytes": r["mem"],
                        "step_s": r["step_s"], "loss_first": r["loss0"], "loss_last": r["loss"]})
    from tabulate import tabulate
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    head = (f"{spec.model.name}: {spec.model.param_count() / 1e9:.2f}B params, seq {spec.model.seq_len}, "
            f"micro-batch {mb}, {prec}; {dev} (catalog {gpu}, peak {peak / 1e12:.0f} TFLOP/s); torch "
            f"{torch.__version__}; median of {steps} steps after {warmup} warm-up")
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump({"header": head, "runs": results}, f, indent=1)
    print("\n" + head)
    print(tabulate(rows, headers=["run", "tokens/s", "MFU %", "peak GiB", "step ms", "loss first -> last",
                                  "target (60 %, 33 GB)"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
