"""Loom's memory model against published measured peaks (torchtitan's Llama 3.1 runs in shared/reference).

Every run in /work/shared/reference/public_runs.json with a measured peak memory is turned into a Loom spec by the
same fixed rules (no per-run tuning) and its predicted per-GPU peak is compared with the measurement:

- what is measured: torchtitan logs torch.cuda.max_memory_reserved() ("Memory = max across GPUs"): the caching
  allocator's reserved memory, which includes fragmentation but not the CUDA context. So the prediction compared
  is Loom's peak minus its CUDA-context constant (CUDA_CONTEXT_BYTES).
- model: the run's dimensions, Llama-3 style (SwiGLU, RMSNorm, RoPE, untied embeddings). Loom splits layers
  evenly, so layers are rounded up to a multiple of pp·vpp: the busiest stage then holds ceil(layers/pp) layers,
  as in torchtitan's split (Llama 3.1 405B: 126 layers over pp = 8 stages -> stages of 16).
- plan: the run's tp, pp, dp, cp, sp and ZeRO stage; micro_batch as stated, else torchtitan's default at the
  source's version: pp micro-batches per step under pipelining (pipeline_parallel_microbatches defaulted to the
  number of stages), one micro-batch of the whole local batch without; "Interleaved1F1B" with vpp = 2 (not
  stated by the source).
- training: bf16 with fp32 gradient reduction (torchtitan's FSDP2 mixed precision: reduce_dtype fp32). Runs
  with Float8 linears are modelled as bf16 (float8 keeps bf16 weights; the measured peaks of bf16 and float8
  variants differ by under 1 %). The recompute the source states maps by one rule (`recompute_for`): "full"
  to Loom's full, torchtitan's per-op selective AC ("per-op SAC") to Loom's "op" (the same policy:
  simulator/activations.py op_layer_bytes), any other "selective" to Loom's selective, nothing to none.
- GPU: the run's memory size (H100 96 GB variant, H200 141 GB); only `fits` depends on it.
- loss and LM head (`assumptions_for`; simulator/memory.py `_logits_bytes`), by the torchtitan version the source
  names: at 9dec370 (the d4c86e37 docs, Dec 2024) the loss runs eager (train.py: "compiling loss function causes
  CUDA errors, turning off for now"), as torch's loss_parallel when tp > 1 (parallel_dims.loss_parallel_enabled:
  tp > 1 unless disabled); at e7c0cae (the June 2025 H200 benchmark, b5bcd76c) components/loss.py
  build_cross_entropy_loss compiles it when training.compile is set, which those runs set. torchtitan's head is
  DTensor ColwiseParallel(input_layouts=Shard(1)) at both versions: under SP it saves its all-gathered input.

Run: `python benchmarks/memory_accuracy.py` (prints a table, the median and p90 absolute error).
"""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from loom.simulator.activations import ActivationAssumptions
from loom.simulator.memory import CUDA_CONTEXT_BYTES, GiB, memory_report
from loom.spec import spec_from_dict

RUNS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "public_runs.json"


@dataclass(frozen=True)
class Comparison:
    run_id: str
    recompute: str
    predicted_GiB: float
    measured_GiB: float
    loss: str = "unfused"

    @property
    def error(self) -> float:
        """Signed relative error of the prediction, (predicted − measured) / measured."""
        return (self.predicted_GiB - self.measured_GiB) / self.measured_GiB


def _hbm_GiB(gpu: str) -> float:
    if "H200" in gpu:
        return 141e9 / GiB
    if "96GB" in gpu:
        return 96e9 / GiB
    return 80.0


def recompute_for(stated: str | None) -> str:
    """Loom's recompute policy for the one a source states (the rule for every run, shared with sim_accuracy.py):
    torchtitan's per-op selective AC is Loom's "op"; other selective AC is Loom's (Korthikanti) selective."""
    v = (stated or "").lower()
    if "full" in v:
        return "full"
    if "per-op" in v:
        return "op"
    return "selective" if "selective" in v else "none"


# torchtitan versions named by the compared runs' sources, and whether that version compiles the loss when
# training.compile is set (torchtitan bbb1b616, Apr 2025, added torch.compile(loss_fn) to build_cross_entropy_loss).
TORCHTITAN_COMPILES_LOSS = {"d4c86e37": False, "b5bcd76c": True}


def assumptions_for(run: dict) -> ActivationAssumptions:
    """What the run's stack keeps at the loss (the rule for every run; module docstring)."""
    versions = [k for k in TORCHTITAN_COMPILES_LOSS if k in run["source"]]
    if len(versions) != 1:
        raise ValueError(f"{run['id']}: source {run['source']!r} names no known torchtitan version")
    compiled = TORCHTITAN_COMPILES_LOSS[versions[0]] and "compile" in run["precision"].lower()
    loss = "compiled" if compiled else ("loss_parallel" if run["parallel"]["tp"] > 1 else "unfused")
    return ActivationAssumptions(loss=loss, sp_gathered_head_input=True)


def spec_dict_for_run(run: dict) -> dict:
    """The Loom spec (as a dict) for one published run, by the fixed rules in the module docstring."""
    md, par, batch = run["model"], run["parallel"], run["batch"]
    schedule = {"1F1B": "1f1b", "Interleaved1F1B": "interleaved"}.get(par.get("pp_schedule") or "", "1f1b")
    vpp = 2 if schedule == "interleaved" else 1
    pp, tp, cp, dp = par["pp"], par["tp"], par["cp"], par["dp"]
    layers = -(-md["layers"] // (pp * vpp)) * pp * vpp
    local = batch["global_batch_seqs"] // dp
    # torchtitan at the source's version (Jan 2025): without pipelining the whole local batch is one micro-batch;
    # with pipelining the local batch is split into pp micro-batches unless the config says otherwise.
    micro = batch.get("micro_batch") or (max(1, local // pp) if pp > 1 else local)
    recompute = recompute_for(par.get("recompute"))
    world = run["num_gpus"]
    gpn = run["gpus_per_node"]
    return {
        "model": {"name": md["name"], "layers": layers, "hidden": md["hidden"], "heads": md["heads"],
                  "kv_heads": md["kv_heads"], "ffn_hidden": md["ffn_hidden"], "vocab": md["vocab"],
                  "seq_len": md["seq_len"]},
        "cluster": {"gpu": "custom", "gpus_per_node": gpn, "nodes": world // gpn,
                    "custom_gpu": {"name": run["gpu"][:40], "peak_tflops": {"bf16": 989.0, "fp8": 1979.0},
                                   "hbm_GB": _hbm_GiB(run["gpu"]), "hbm_GBps": 3350.0,
                                   "intra_node_GBps": 450.0, "inter_node_GBps": 50.0}},
        "training": {"global_batch": batch["global_batch_seqs"], "micro_batch": micro, "precision": "bf16",
                     "grad_dtype": "fp32", "optimizer": "adamw", "recompute": recompute},
        "parallel": {"dp": dp, "tp": tp, "pp": pp, "cp": cp, "sp": bool(par.get("sp")),
                     "zero": par.get("zero_stage") or 0, "schedule": schedule, "vpp": vpp},
    }


def compare(runs_path: Path = RUNS) -> list[Comparison]:
    runs = [r for r in json.loads(runs_path.read_text()) if r["measured"].get("peak_mem_GB") is not None]
    out = []
    for run in runs:
        d = spec_dict_for_run(run)
        a = assumptions_for(run)
        report = memory_report(spec_from_dict(d), a)
        measured = run["measured"].get("peak_mem_GiB") or run["measured"]["peak_mem_GB"] * 1e9 / GiB
        out.append(Comparison(run["id"], d["training"]["recompute"],
                              (report.peak_bytes - CUDA_CONTEXT_BYTES) / GiB, measured, a.loss))
    return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1])."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))]


def summary(rows: list[Comparison]) -> dict[str, float]:
    errs = [abs(r.error) for r in rows]
    return {"n": len(rows), "median_abs_error": statistics.median(errs), "p90_abs_error": percentile(errs, 0.9),
            "mean_signed_error": statistics.fmean(r.error for r in rows)}


def main() -> int:
    rows = compare()
    print(f"{'run':48s} {'recompute':9s} {'loss':13s} {'pred GiB':>9s} {'meas GiB':>9s} {'error':>7s}")
    for r in rows:
        print(f"{r.run_id:48s} {r.recompute:9s} {r.loss:13s} {r.predicted_GiB:9.1f} {r.measured_GiB:9.1f} "
              f"{r.error:+7.1%}")
    groups = {"all": rows, "full recompute": [r for r in rows if r.recompute == "full"],
              "per-op SAC (Loom op)": [r for r in rows if r.recompute == "op"]}
    for name, group in groups.items():
        if group:
            s = summary(group)
            print(f"{name:32s} n={s['n']:2d}  median |err| {s['median_abs_error']:6.1%}  "
                  f"p90 |err| {s['p90_abs_error']:6.1%}  mean signed {s['mean_signed_error']:+6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
