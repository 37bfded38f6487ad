"""`loom budget`: a compute budget -> a compute-optimal model, its tokens and loss, a plan, days and dollars.

The scaling-law arithmetic is in `scaling_laws.py` (Hoffmann et al. 2022; Sardana et al. 2023; de Vries 2023).
Here: turning GPU-hours or dollars into FLOPs (at a stated MFU), choosing a concrete Llama-style shape for the
chosen parameter count, and taking it to the cluster with `search`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

from loom.spec.errors import SpecError, SpecIssue
from loom.spec.gpus import CATALOG, lookup
from loom.spec.model import ModelSpec
from loom.spec.presets import PRESETS

from .scaling_laws import (CHINCHILLA, ChinchillaFit, critical_model_fraction, fraction_at_overhead,
                           harms_overhead, inference_optimal, overtrained, twenty_tokens_rule)

DEFAULT_MFU = 0.40               # assumed when a budget is given in GPU-hours or dollars (stated in the output)
HARMS_FRACTIONS = (1.0, 0.75, 0.5, 0.4, 0.3, 0.2, 0.15)
INFERENCE_DEMANDS = (0.0, 1e11, 1e12, 1e13, 1e14)
# Llama-style shapes: head_dim 128, 8 KV heads (GQA), SwiGLU ffn = 3.5·hidden rounded to 256, hidden/layers
# near 128 (Llama 3: 8B 4096/32 = 128, 70B 8192/80 = 102, 405B 16384/126 = 130; Kaplan et al. 2020 §3.1 find
# loss flat over a wide range of aspect ratios, so the exact ratio matters little).
HEAD_DIM = 128
TARGET_ASPECT = 128.0
ASPECT_RANGE = (64.0, 192.0)
LLAMA3_8B_15T = (8.03e9, 15e12)  # Meta 2024, "The Llama 3 Herd of Models" §3: 8B trained on ~15T tokens
PRESET_TOLERANCE = 0.10          # use a published preset when its parameter count is within 10 % of the target


# ---- budget -> FLOPs --------------------------------------------------------------------------------------
def budget_flops(flops: float | None = None, gpu_hours: float | None = None, dollars: float | None = None,
                 gpu: str = "H100-SXM", mfu: float = DEFAULT_MFU, price_per_gpu_hour: float | None = None,
                 precision: str = "bf16") -> tuple[float, list[str]]:
    """Training FLOPs for the budget, and the assumptions made to get them (one sentence each)."""
    given = {k: v for k, v in (("flops", flops), ("gpu_hours", gpu_hours), ("dollars", dollars)) if v is not None}
    if len(given) != 1:
        raise SpecError([SpecIssue("budget", sorted(given) or None, "give exactly one budget.",
                                   "pass one of flops=, gpu_hours= or dollars=.")])
    (name, value), = given.items()
    if not value > 0 or not math.isfinite(value):
        raise SpecError([SpecIssue(name, value, "a budget must be a positive number.", f"pass {name} > 0.")])
    if name == "flops":
        return float(value), [f"budget: {value:.3g} training FLOPs (C ≈ 6·N·D, Hoffmann et al. 2022 §3)"]
    g = lookup(gpu)
    if g is None:
        raise SpecError([SpecIssue("gpu", gpu, "unknown GPU.", f"use one of {list(CATALOG)}.")])
    if not 0 < mfu <= 1:
        raise SpecError([SpecIssue("mfu", mfu, "MFU is a fraction of peak.", "pass 0 < mfu ≤ 1, e.g. 0.4.")])
    notes = []
    hours = value
    if name == "dollars":
        price = price_per_gpu_hour or g.price_per_gpu_hour
        if not price or price <= 0:
            raise SpecError([SpecIssue("price_per_gpu_hour", price, "a dollar budget needs a GPU-hour price.",
                                       "pass price_per_gpu_hour= (USD), e.g. 2.0.")])
        hours = value / price
        notes.append(f"budget: ${value:,.0f} at ${price:g}/GPU-hour = {hours:,.0f} GPU-hours")
    peak = g.peak_flops[precision]
    flops_total = hours * 3600 * peak * mfu
    notes.append(f"{hours:,.0f} {g.name} GPU-hours × {peak / 1e12:.0f} TFLOP/s {precision} peak × assumed MFU "
                 f"{mfu:.0%} = {flops_total:.3g} FLOPs")
    return flops_total, notes


# ---- a concrete shape for N parameters ---------------------------------------------------------------------
def llama_shape(n_params: float, seq_len: int = 8192, vocab: int = 128256) -> ModelSpec:
    """A Llama-style ModelSpec with about `n_params` parameters.

    Rule (stated in the output): a published Llama preset within 10 % of the target; otherwise, for each hidden
    size that is a multiple of 128 (heads = hidden/128, 8 KV heads when heads allow, ffn = 3.5·hidden rounded to
    a multiple of 256, untied embeddings), the layer count (a multiple of 4 from 16 layers) that best matches
    the target, keeping the
    aspect ratio hidden/layers in [64, 192]; among those within 3 % of the target, the aspect closest to 128."""
    if n_params <= 0:
        raise ValueError("n_params must be positive")
    llama = {k: v for k, v in PRESETS.items() if k.startswith("llama")}
    best_preset = min(llama, key=lambda k: abs(ModelSpec(**llama[k]).param_count() / n_params - 1))
    pm = ModelSpec(name=best_preset, **llama[best_preset])
    if abs(pm.param_count() / n_params - 1) <= PRESET_TOLERANCE:
        return pm.model_copy(update={"seq_len": seq_len}) if seq_len != pm.seq_len else pm

    candidates: list[tuple[float, float, ModelSpec, bool]] = []
    # heads: multiples of 4 up to 32, then of 8, so that TP of 4 (8) divides heads and the KV heads
    for heads in (2, *range(4, 32, 4), *range(32, 513, 8)):
        hidden = heads * HEAD_DIM
        kv = next(k for k in (8, 4, 2, 1) if heads % k == 0)
        ffn = max(256, 256 * round(3.5 * hidden / 256))
        one = ModelSpec(layers=1, hidden=hidden, heads=heads, kv_heads=kv, ffn_hidden=ffn, vocab=vocab,
                        seq_len=seq_len)
        per_layer = one.layer_params()
        fixed = one.param_count() - per_layer
        step = 4 if (n_params - fixed) / per_layer >= 16 else 2   # layer counts with divisors for pp
        layers = max(2, step * round((n_params - fixed) / per_layer / step))
        m = one.model_copy(update={"layers": layers, "name": f"llama-style-{_human(n_params)}"})
        in_range = ASPECT_RANGE[0] <= hidden / layers <= ASPECT_RANGE[1]
        candidates.append((abs(m.param_count() / n_params - 1), abs(hidden / layers - TARGET_ASPECT), m, in_range))
    close = [c for c in candidates if c[3] and c[0] <= 0.03]
    if close:
        return min(close, key=lambda c: c[1])[2]
    # none within 3 % in the aspect range (small models, where the 128K-vocab embeddings dominate): trade the
    # parameter error against the aspect ratio's distance from 128 (in octaves)
    return min(candidates, key=lambda c: c[0] + 0.25 * abs(math.log2(c[2].hidden / c[2].layers / TARGET_ASPECT)))[2]


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


# ---- the result ------------------------------------------------------------------------------------------
@dataclass
class SizePoint:
    rule: str
    n_params: float
    tokens: float
    loss: float
    flops: float

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.n_params


@dataclass
class BudgetResult:
    flops: float
    assumptions: list[str]
    twenty_tokens: SizePoint                     # D = 20·N (Hoffmann et al. 2022 approaches 1/2)
    fit_optimal: SizePoint                       # approach-3 parametric optimum
    inference_tradeoff: list[dict]               # Sardana et al. 2023, one row per inference demand
    harms_law: list[dict]                        # de Vries 2023, one row per model fraction k
    critical_fraction: float                     # k where the overhead diverges
    fraction_at_double_compute: float            # k where the overhead is 100 %
    model: ModelSpec                             # the concrete shape trained
    model_rule: str
    params: int
    tokens: float
    loss: float
    inference_tokens: float
    overtrained_example: dict                    # Llama 3 8B on 15T tokens vs its compute-optimal twin
    cluster: dict
    plan: dict | None = None                     # best plan from search (ParallelSpec fields + micro_batch, recompute)
    step_time_s: float | None = None
    mfu: float | None = None                     # of the plan (simulated), or the assumed one when no plan
    days: float | None = None
    cost_usd: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.model_dump()
        d["twenty_tokens"]["tokens_per_param"] = self.twenty_tokens.tokens_per_param
        d["fit_optimal"]["tokens_per_param"] = self.fit_optimal.tokens_per_param
        return d


def _point(rule: str, n: float, d: float, fit: ChinchillaFit) -> SizePoint:
    return SizePoint(rule, n, d, fit.loss(n, d), 6 * n * d)


def plan_budget(flops: float | None = None, gpu_hours: float | None = None, dollars: float | None = None,
                gpu: str = "H100-SXM", num_gpus: int = 1024, gpus_per_node: int = 8,
                price_per_gpu_hour: float | None = 2.0, inference_tokens: float = 0.0,
                mfu: float = DEFAULT_MFU, seq_len: int = 8192, global_batch_tokens: int = 4 * 2**20,
                search_plan: bool = True, fit: ChinchillaFit = CHINCHILLA,
                progress: Callable[[int, int], None] | None = None) -> BudgetResult:
    """Size a model for the budget and, with `search_plan`, find its best plan on `num_gpus` × `gpu`.

    The chosen size is the 20-tokens-per-parameter point (the paper's Chinchilla rule); with
    `inference_tokens` > 0 it is instead Sardana et al.'s inference-optimal model at the loss the fit predicts
    for the compute-optimal model (trained longer than the budget buys: its training FLOPs are reported)."""
    c, notes = budget_flops(flops, gpu_hours, dollars, gpu, mfu, price_per_gpu_hour)
    if inference_tokens < 0:
        raise SpecError([SpecIssue("inference_tokens", inference_tokens, "cannot be negative.", "pass ≥ 0.")])
    if num_gpus <= 0 or gpus_per_node <= 0 or num_gpus % gpus_per_node:
        near = gpus_per_node * max(1, round(num_gpus / max(gpus_per_node, 1)))
        raise SpecError([SpecIssue("num_gpus", num_gpus, f"must be a positive multiple of gpus_per_node = "
                                   f"{gpus_per_node}.", f"use {near}.")])
    if lookup(gpu) is None:
        raise SpecError([SpecIssue("gpu", gpu, "unknown GPU.", f"use one of {list(CATALOG)}.")])
    n20, d20 = twenty_tokens_rule(c)
    p20 = _point("20 tokens/param", n20, d20, fit)
    nf, df = fit.optimal(c)
    pf = _point("approach-3 fit", nf, df, fit)

    rows = []
    ref = inference_optimal(p20.loss, 0.0, fit)     # the fit's compute-optimal model at this loss
    for demand in sorted({*INFERENCE_DEMANDS, float(inference_tokens)}):
        r = inference_optimal(p20.loss, demand, fit)
        base = ref.train_flops + 2 * ref.n_params * demand
        rows.append(dict(inference_tokens=demand, n_params=r.n_params, train_tokens=r.train_tokens,
                         tokens_per_param=r.tokens_per_param, train_flops=r.train_flops,
                         total_flops=r.total_flops, saving_vs_compute_optimal=1 - r.total_flops / base))
    ex = overtrained(*LLAMA3_8B_15T, fit)
    example = dict(name="Llama 3 8B on 15T tokens", n_params=ex.n_params, tokens=ex.tokens, loss=ex.loss,
                   optimal_params=ex.optimal_params, optimal_tokens=ex.optimal_tokens,
                   train_flops=ex.train_flops, optimal_flops=ex.optimal_flops,
                   breakeven_inference_tokens=ex.breakeven_inference_tokens)
    harms = [dict(fraction=k, n_params=k * nf, compute_overhead=harms_overhead(k, c, fit))
             for k in HARMS_FRACTIONS]

    if inference_tokens > 0:
        chosen = next(r for r in rows if r["inference_tokens"] == float(inference_tokens))
        n_target, rule = chosen["n_params"], "inference-optimal (Sardana et al. 2023) at the 20-tokens/param loss"
    else:
        n_target, rule = n20, "20 tokens/param (Hoffmann et al. 2022)"
    model = llama_shape(n_target, seq_len=seq_len)
    n_real = model.param_count()
    tokens = (fit.tokens_for_loss(n_real, p20.loss) if inference_tokens > 0 else c / (6 * n_real))
    shape_note = ("nearest Llama preset within 10 %" if model.name in PRESETS else
                  "Llama-style rule: head_dim 128, 8 KV heads, ffn 3.5·hidden, hidden/layers ≈ 128")
    notes.append(f"model shape: {shape_note}; {n_real / 1e9:.3g}B parameters for a {n_target / 1e9:.3g}B target")
    if inference_tokens > 0:
        notes.append(f"training FLOPs {6 * n_real * tokens:.3g} exceed the budget {c:.3g}: the smaller model is "
                     f"trained longer to the same loss, and pays back over {inference_tokens:.3g} inference tokens")

    price = price_per_gpu_hour if price_per_gpu_hour else lookup(gpu).price_per_gpu_hour
    result = BudgetResult(
        flops=c, assumptions=notes, twenty_tokens=p20, fit_optimal=pf, inference_tradeoff=rows, harms_law=harms,
        critical_fraction=critical_model_fraction(fit), fraction_at_double_compute=fraction_at_overhead(1.0, fit),
        model=model, model_rule=rule, params=n_real, tokens=tokens, loss=fit.loss(n_real, tokens),
        inference_tokens=float(inference_tokens), overtrained_example=example,
        cluster=dict(gpu=lookup(gpu).name, num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                     price_per_gpu_hour=price))
    _time_to_train(result, gpu, num_gpus, gpus_per_node, price, mfu, seq_len, global_batch_tokens,
                   search_plan, progress)
    return result


def _time_to_train(r: BudgetResult, gpu: str, num_gpus: int, gpus_per_node: int, price: float | None,
                   mfu: float, seq_len: int, global_batch_tokens: int, search_plan: bool,
                   progress: Callable[[int, int], None] | None) -> None:
    """Days and dollars: from the best searched plan's simulated step time, else from the assumed MFU."""
    g = lookup(gpu)
    train_flops = r.tokens * r.model.model_flops_per_token()
    if search_plan:
        from loom.spec.spec import ClusterSpec, Spec, TrainingSpec
        from .search import search
        global_batch = max(1, round(global_batch_tokens / seq_len))
        spec = Spec(model=r.model, cluster=ClusterSpec(gpu=g.name, gpus_per_node=gpus_per_node,
                                                       nodes=num_gpus // gpus_per_node,
                                                       price_per_gpu_hour=price),
                    training=TrainingSpec(global_batch=global_batch, tokens=r.tokens), parallel="auto")
        res = search(spec, top_k=1, progress=progress)
        if res.rows:
            best = res.rows[0]
            r.plan = best.plan_dict()
            r.step_time_s = best.best_step_time_s          # the event simulator's, where it ran
            r.mfu = best.event_mfu if best.event_mfu is not None else best.mfu
            steps = r.tokens / spec.tokens_per_step
            r.days = steps * r.step_time_s / 86400
        else:
            r.notes.append(f"no plan fits {r.model.name} on {num_gpus} × {g.name}: {res.rejection_summary()}")
    if r.days is None:
        r.mfu = mfu
        r.days = train_flops / (num_gpus * g.peak_flops["bf16"] * mfu) / 86400
        r.notes.append(f"days at the assumed MFU {mfu:.0%} (no simulated plan)")
    if price:
        r.cost_usd = r.days * 24 * num_gpus * price


# ---- text ------------------------------------------------------------------------------------------------
def format_budget(r: BudgetResult) -> str:
    from tabulate import tabulate
    out = [f"Budget: {r.flops:.3g} FLOPs"] + [f"  - {a}" for a in r.assumptions]
    out.append("\nCompute-optimal size (Hoffmann et al. 2022):")
    out.append(tabulate([[p.rule, _human(p.n_params), _human(p.tokens), f"{p.tokens_per_param:.1f}",
                          f"{p.loss:.4f}"] for p in (r.twenty_tokens, r.fit_optimal)],
                        headers=["rule", "params", "tokens", "tokens/param", "predicted loss"]))
    out.append("\nInference-aware sizing at the same loss (Sardana et al. 2023; total = 6·N·D_train + 2·N·D_inf):")
    out.append(tabulate([[f"{x['inference_tokens']:.3g}", _human(x["n_params"]), _human(x["train_tokens"]),
                          f"{x['tokens_per_param']:.0f}", f"{x['train_flops']:.3g}", f"{x['total_flops']:.3g}",
                          f"{x['saving_vs_compute_optimal']:.1%}"] for x in r.inference_tradeoff],
                        headers=["inference tokens", "params", "train tokens", "tokens/param", "train FLOPs",
                                 "total FLOPs", "saving vs compute-optimal"]))
    e = r.overtrained_example
    out.append(f"{e['name']}: predicted loss {e['loss']:.4f}, the loss of a compute-optimal "
               f"{_human(e['optimal_params'])} model on {_human(e['optimal_tokens'])} tokens; it spends "
               f"{e['train_flops'] / e['optimal_flops']:.2f}× the training FLOPs and repays them after "
               f"{e['breakeven_inference_tokens']:.3g} inference tokens")
    out.append("\nHarm's law (de Vries 2023): extra compute to reach the compute-optimal loss with a smaller model:")
    out.append(tabulate([[f"{h['fraction']:.2f}", _human(h["n_params"]),
                          "inf" if math.isinf(h["compute_overhead"]) else f"{h['compute_overhead']:+.1%}"]
                         for h in r.harms_law], headers=["k (× optimal size)", "params", "compute overhead"]))
    out.append(f"critical model size: overhead doubles compute at k = {r.fraction_at_double_compute:.2f}, "
               f"diverges at k = {r.critical_fraction:.3f}")
    m = r.model
    out.append(f"\nModel: {m.name} ({r.model_rule}): {m.layers} layers, hidden {m.hidden}, heads {m.heads} "
               f"(kv {m.n_kv_heads}), ffn {m.ffn_hidden}, vocab {m.vocab}, seq {m.seq_len}: "
               f"{r.params:,} parameters, {_human(r.tokens)} tokens, predicted loss {r.loss:.4f}")
    c = r.cluster
    if r.plan:
        p = r.plan
        out.append(f"Best plan on {c['num_gpus']} × {c['gpu']}: dp={p['dp']} tp={p['tp']} pp={p['pp']} cp={p['cp']} "
                   f"sp={p['sp']} zero={p['zero']} {p['schedule']} vpp={p['vpp']} micro_batch={p['micro_batch']} "
                   f"recompute={p['recompute']}: step {r.step_time_s:.3f} s, MFU {r.mfu:.1%} (simulated)")
    out.append(f"Time to train: {r.days:,.1f} days on {c['num_gpus']} × {c['gpu']}"
               + (f", cost ${r.cost_usd:,.0f} at ${c['price_per_gpu_hour']:g}/GPU-hour" if r.cost_usd else ""))
    out += [f"note: {n}" for n in r.notes]
    return "\n".join(out)
