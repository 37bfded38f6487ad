"""How close the step-time simulator comes to published training runs (shared/reference/public_runs.json).

Every run with a measured (or source-derived) step time or throughput is turned into a Spec with the same rules for
all runs (no per-run constants), simulated with the catalog's hardware profile, and compared on step time:
- runs with `step_time_s` or `step_time_s_derived` (MosaicML, torchtitan): predicted vs that step time;
- runs with only `tflops_per_gpu` (Megatron-LM README, flops_convention null): converted to a step time with
  Loom's model FLOPs per token (PaLM convention, = Megatron-LM's `num_floating_point_operations` up to its
  causal/non-causal attention term) - flagged "via TFLOP/s" in the table.
Missing fields get one documented default each (see `spec_for_run`); runs that cannot be mapped are listed with the
reason. Error = predicted / measured - 1. Run: .venv/bin/python benchmarks/sim_accuracy.py [--all] [--json PATH]
[--stack-aware]. The default uses one profile (the catalog's, eager PyTorch, FlashAttention-2) for every run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from loom.spec import ClusterSpec, ModelSpec, ParallelSpec, Spec, TrainingSpec
from loom.simulator import simulate_time

RUNS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "public_runs.json"


def _gpu(name: str) -> str:
    n = name.upper()
    if n.startswith("A100-40"):
        return "A100-40GB"
    if n.startswith("A100"):
        return "A100-80GB"
    if n.startswith("H200"):
        return "H200"
    if n.startswith("H100"):
        return "H100-SXM"            # incl. Meta's 96 GB / 500 W variant: its peak is unknown, SXM assumed
    raise ValueError(f"unknown GPU {name!r}")


def _recompute(value: str | None) -> str:
    """The stated recompute as Loom's policy, by the rule memory_accuracy.py's recompute_for states: torchtitan's
    per-op selective AC ("selective (per-op SAC)") is Loom's "op", other selective AC Loom's selective."""
    if value is None:
        return "selective"           # Loom's default, used when the source does not say
    v = value.lower()
    if v.startswith("full"):
        return "full"
    if "per-op" in v:
        return "op"
    return "selective" if v.startswith("selective") else "none"


def megatron_overlaps(run: dict, tp: int, dp: int, cp: int) -> dict:
    """Parallel options implied by the Megatron-LM flags a run's notes name (one rule for every run; only the
    Megatron-LM README rows name them): --tp-comm-overlap -> tp_comm_overlap with sp (Megatron asserts sequence
    parallelism with it; at tp = 1 it turns both off); --overlap-param-gather -> overlap_param_gather with zero = 1
    (Megatron asserts --use-distributed-optimizer with it; no-op without data parallelism). --overlap-grad-reduce
    is how Loom always models DP (bucketed reduction beside the backward)."""
    notes = run.get("notes") or ""
    out: dict = {}
    if "--tp-comm-overlap" in notes and tp > 1:
        out.update(tp_comm_overlap=True, sp=True)
    if "--overlap-param-gather" in notes and dp * cp > 1:
        out.update(overlap_param_gather=True, zero=max(1, (run["parallel"].get("zero_stage") or 0)))
    return out


def spec_for_run(run: dict) -> Spec:
    """The Spec of a published run. Defaults for fields the source leaves null (one rule for every run):
    kv_heads = heads (MHA), ffn_hidden = 4·hidden, micro_batch = global / (dp · grad_accum) or 1, zero = 0,
    recompute = selective; the overlap flags a run's notes name map by `megatron_overlaps`. Architecture: names starting with "Llama" are SwiGLU/RMSNorm, all others (MPT, GPT)
    GeLU/LayerNorm without biases. FP8 in the precision string -> fp8 GEMMs."""
    m, p, b = run["model"], run["parallel"], run["batch"]
    llama = m["name"].lower().startswith("llama")
    model = ModelSpec(name=m["name"], layers=m["layers"], hidden=m["hidden"], heads=m["heads"],
                      kv_heads=m["kv_heads"] or m["heads"], ffn_hidden=m["ffn_hidden"] or 4 * m["hidden"],
                      vocab=m["vocab"], seq_len=m["seq_len"], activation="swiglu" if llama else "gelu",
                      norm="rmsnorm" if llama else "layernorm")
    tp, pp, cp = p.get("tp") or 1, p.get("pp") or 1, p.get("cp") or 1
    dp = p.get("dp") or 1
    if dp * tp * pp * cp != run["num_gpus"]:
        raise ValueError(f"dp·tp·pp·cp = {dp * tp * pp * cp} != {run['num_gpus']} GPUs (layout not stated)")
    gb = b["global_batch_seqs"]
    mb = b["micro_batch"] or (gb // (dp * b["grad_accum"]) if b.get("grad_accum") else 1)
    if gb % (dp * mb):
        raise ValueError(f"global batch {gb} not divisible by dp·micro_batch = {dp * mb}")
    sched = (p.get("pp_schedule") or "1f1b").lower()
    interleaved = pp > 1 and ("interleav" in sched or (p.get("vpp") or 1) > 1)
    vpp = (p.get("vpp") or 2) if interleaved else 1
    micro = gb // (dp * mb)
    if interleaved and micro % pp:
        raise ValueError(f"interleaved schedule with {micro} micro-batches not divisible by pp={pp}")
    prec = "fp8" if "fp8" in run["precision"].lower() or "float8" in run["precision"].lower() else "bf16"
    gpn = run.get("gpus_per_node") or 8
    cluster = ClusterSpec(gpu=_gpu(run["gpu"]), gpus_per_node=min(gpn, run["num_gpus"]),
                          nodes=max(1, run["num_gpus"] // gpn),
                          intra_node_GBps=run.get("intra_node_bw_GBps"), inter_node_GBps=run.get("inter_node_bw_GBps"))
    training = TrainingSpec(global_batch=gb, micro_batch=mb, precision=prec, recompute=_recompute(p.get("recompute")))
    zero = p.get("zero_stage") or 0
    parallel = ParallelSpec(**{"dp": dp, "tp": tp, "pp": pp, "cp": cp, "sp": bool(p.get("sp")) and tp > 1,
                               "zero": zero, "schedule": "interleaved" if interleaved else "1f1b", "vpp": vpp,
                               **megatron_overlaps(run, tp, dp, cp)})
    return Spec(model=model, cluster=cluster, training=training, parallel=parallel)


def measured_step(run: dict, spec: Spec) -> tuple[float, str] | None:
    meas = run["measured"]
    for key in ("step_time_s", "step_time_s_derived"):
        if meas.get(key):
            return meas[key], key
    if meas.get("tflops_per_gpu"):
        tokens_per_s = meas["tflops_per_gpu"] * 1e12 * run["num_gpus"] / spec.model.model_flops_per_token()
        return spec.tokens_per_step / tokens_per_s, "via TFLOP/s"
    return None


def stack_profile(run: dict) -> dict:
    """--stack-aware: what the source states about its software stack, mapped to profile fields (the same rule for
    every run that states it). Megatron-LM (TransformerEngine: fused kernels, cuDNN attention) and runs built with
    torch.compile get fused elementwise traffic; Megatron also the cuDNN attention fit. Nothing is fitted."""
    from loom.simulator.hardware import ATTENTION_KERNELS
    out: dict = {}
    text = f"{run['id']} {run['precision']} {run.get('notes', '')}".lower()
    if "megatron" in run["source"].lower():
        a, s, d = ATTENTION_KERNELS["cudnn_hopper"]
        out.update(elementwise_traffic=1.0, attn_eff_max=a, attn_half_seq=s, attn_half_dim=d)
    elif "compile" in text:
        out.update(elementwise_traffic=1.0)
    return out


def evaluate(runs: list[dict], stack_aware: bool = False) -> tuple[list[dict], list[tuple[str, str]]]:
    rows, skipped = [], []
    for run in runs:
        try:
            spec = spec_for_run(run)
        except (ValueError, KeyError) as e:
            skipped.append((run["id"], str(e)))
            continue
        ref = measured_step(run, spec)
        if ref is None:
            skipped.append((run["id"], "no step time or throughput"))
            continue
        r = simulate_time(spec, profile=stack_profile(run) if stack_aware else None)
        rows.append({"id": run["id"], "source": run["source"].split()[0], "gpu": spec.cluster.gpu,
                     "measured_s": ref[0], "basis": ref[1], "predicted_s": r.step_time_s,
                     "error": r.step_time_s / ref[0] - 1, "pred_mfu": r.mfu, "bubble": r.bubble_fraction,
                     "exposed": {k: round(v, 4) for k, v in r.exposed_comm_s.items()}})
    return rows, skipped


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summary(rows: list[dict]) -> dict:
    out = {}
    groups = {"all": rows}
    for r in rows:
        groups.setdefault(f"{r['source']} {r['gpu']}", []).append(r)
    for name, rs in groups.items():
        errs = [abs(r["error"]) for r in rs]
        out[name] = {"n": len(rs), "median_abs_err": statistics.median(errs), "p90_abs_err": _pct(errs, 0.9),
                     "median_signed_err": statistics.median(r["error"] for r in rs)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="print every run (default: summary and worst 15)")
    ap.add_argument("--json", help="write rows and summary to this file")
    ap.add_argument("--stack-aware", action="store_true",
                    help="fused kernels / cuDNN attention for runs whose source says so (see stack_profile)")
    args = ap.parse_args(argv)
    runs = json.loads(RUNS.read_text())
    rows, skipped = evaluate(runs, args.stack_aware)
    shown = rows if args.all else sorted(rows, key=lambda r: -abs(r["error"]))[:15]
    print(f"{'run':60s} {'basis':20s} {'measured':>9s} {'predicted':>9s} {'error':>7s}")
    for r in shown:
        print(f"{r['id'][:60]:60s} {r['basis']:20s} {r['measured_s']:9.3f} {r['predicted_s']:9.3f} "
              f"{r['error']:+7.1%}")
    print(f"\n{len(rows)} runs compared, {len(skipped)} skipped")
    for rid, why in skipped:
        print(f"  skipped {rid}: {why}")
    print(f"\n{'group':55s} {'n':>4s} {'median|err|':>11s} {'p90|err|':>9s} {'median err':>10s}")
    summ = summary(rows)
    for name, s in summ.items():
        print(f"{name[:55]:55s} {s['n']:4d} {s['median_abs_err']:11.1%} {s['p90_abs_err']:9.1%} "
              f"{s['median_signed_err']:+10.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "skipped": skipped, "summary": summ}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
