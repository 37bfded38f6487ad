"""Checks that relate fields across tables. Each returns SpecIssues naming the field, the value and the fix.

Rules and why:
- world size: dp·tp·pp·cp must equal gpus_per_node·nodes (every GPU holds exactly one rank).
- tp must divide heads and kv_heads (Megatron-LM's rule: query groups are split over TP ranks, never replicated)
  and ffn_hidden (column-parallel MLP). The vocabulary is padded up to a multiple of tp (Megatron pads to 128·tp),
  so vocab needs no check.
- pp·vpp must divide layers, unless uneven_split = true asks for the Llama 3 split (first and last virtual
  stages one layer lighter); every virtual stage needs a layer.
- cp > 1 splits the sequence in 2·cp zigzag chunks (load-balanced causal ring attention), so seq_len % (2·cp) == 0;
  with sp the local sequence is further split over tp.
- global_batch must be divisible by dp·micro_batch (whole micro-batches per replica).
- sp shards activations over the TP group, so it needs tp > 1.
- interleaved needs vpp > 1 and, as Megatron-LM requires, micro-batches per step divisible by pp;
  afab/1f1b take vpp = 1.
- fp8 only on GPUs with FP8 tensor cores; the CPU target trains in fp32.
- tp_comm_overlap needs tp > 1 and sp: Megatron-LM asserts "Tensor parallel communication/GEMM overlap can happen
  only when sequence parallelism is enabled" (megatron/training/arguments.py) and turns sp off at tp = 1.
- overlap_param_gather needs zero >= 1 and dp·cp > 1: Megatron-LM asserts "--overlap-param-gather only supported
  with distributed optimizer" (arguments.py); without a sharded optimizer there is no parameter all-gather.
- recompute = "op" (per-op selective AC) needs cp = 1: the policy saves the attention kernel's outputs, and the
  executor's ring attention (cp > 1) is not one op the policy can save (it would be recomputed, with its K/V ring).
"""
from __future__ import annotations

import difflib

from .errors import SpecIssue, divisors, nearest
from .gpus import CATALOG, lookup
from .spec import MESH_DIMS, Spec


def _factorizations(world: int, tp: int, pp: int, cp: int) -> str:
    """A hint: the dp that would make the world size work, or the nearest world size."""
    rest = tp * pp * cp
    if world % rest == 0:
        return f"set parallel.dp = {world // rest} (dp·tp·pp·cp must equal {world})"
    return (f"tp·pp·cp = {rest} does not divide the {world} GPUs; pick tp, pp, cp among the divisors of {world}: "
            f"{divisors(world)}")


def check_cluster(spec: Spec) -> list[SpecIssue]:
    c = spec.cluster
    issues: list[SpecIssue] = []
    if c.custom_gpu is None and lookup(c.gpu) is None:
        close = difflib.get_close_matches(c.gpu, list(CATALOG), n=3, cutoff=0.3)
        issues.append(SpecIssue("cluster.gpu", c.gpu, "unknown GPU.",
                                f"use one of {close or list(CATALOG)}, or describe it in a [cluster.custom_gpu] table "
                                "(peak_tflops, hbm_GB, hbm_GBps, intra_node_GBps, inter_node_GBps)."))
        return issues
    gpu = c.resolve_gpu()
    if not gpu.supports(spec.training.precision):
        issues.append(SpecIssue("training.precision", spec.training.precision,
                                f"{gpu.name} has no {spec.training.precision} support in the catalog.",
                                f"use one of {sorted(gpu.peak_flops)}."))
    return issues


def check_parallel(spec: Spec) -> list[SpecIssue]:
    if spec.parallel == "auto":
        return []
    p, m, t = spec.plan, spec.model, spec.training
    issues: list[SpecIssue] = []
    world = spec.world_size
    if p.size != world:
        issues.append(SpecIssue("parallel", f"dp={p.dp} tp={p.tp} pp={p.pp} cp={p.cp}",
                                f"dp·tp·pp·cp = {p.size} but the cluster has {world} GPUs "
                                f"({spec.cluster.gpus_per_node} per node × {spec.cluster.nodes} nodes).",
                                _factorizations(world, p.tp, p.pp, p.cp)))
    common = [d for d in divisors(m.heads) if m.n_kv_heads % d == 0 and m.ffn_hidden % d == 0]
    if m.heads % p.tp:
        issues.append(SpecIssue("parallel.tp", p.tp, f"tp must divide model.heads = {m.heads}.",
                                f"use tp in {nearest(p.tp, common)}."))
    elif m.n_kv_heads % p.tp:
        issues.append(SpecIssue("parallel.tp", p.tp,
                                f"tp must divide model.kv_heads = {m.n_kv_heads} (KV groups are split over TP "
                                "ranks, not replicated, as in Megatron-LM).",
                                f"use tp in {nearest(p.tp, common)}."))
    if m.ffn_hidden % p.tp:
        issues.append(SpecIssue("parallel.tp", p.tp, f"tp must divide model.ffn_hidden = {m.ffn_hidden}.",
                                f"use tp in {nearest(p.tp, common)}."))
    if p.pp * p.vpp > m.layers:
        issues.append(SpecIssue("parallel.pp", p.pp,
                                f"pp·vpp = {p.pp * p.vpp} virtual stages but model.layers = {m.layers}: every "
                                "virtual stage needs at least one layer.",
                                f"use pp·vpp ≤ {m.layers}."))
    elif m.layers % (p.pp * p.vpp) and not p.uneven_split:
        ok = [d for d in divisors(m.layers) if d % p.vpp == 0 and d // p.vpp >= 1]
        pps = [d // p.vpp for d in ok]
        issues.append(SpecIssue("parallel.pp", p.pp,
                                f"pp·vpp = {p.pp * p.vpp} does not divide model.layers = {m.layers}.",
                                f"use pp in {nearest(p.pp, pps)} with vpp = {p.vpp}, or set parallel.uneven_split "
                                "= true (the first and last stages get fewer layers, as Llama 3 405B does)."))
    if p.cp > 1 and m.seq_len % (2 * p.cp):
        issues.append(SpecIssue("model.seq_len", m.seq_len,
                                f"context parallel cp = {p.cp} splits the sequence into 2·cp = {2 * p.cp} zigzag chunks.",
                                f"use a seq_len divisible by {2 * p.cp}, or cp in "
                                f"{nearest(p.cp, [d for d in divisors(m.seq_len // 2 or 1) if d > 0])}."))
    local_seq = m.seq_len // p.cp
    if p.sp and p.tp > 1 and local_seq % p.tp:
        issues.append(SpecIssue("parallel.sp", p.sp,
                                f"sequence parallel splits the local sequence ({local_seq} tokens) over tp = {p.tp}.",
                                f"use a seq_len divisible by cp·tp = {p.cp * p.tp}, or sp = false."))
    if t.global_batch % (p.dp * t.micro_batch):
        per = p.dp * t.micro_batch
        ok_batches = nearest(t.global_batch, [per * k for k in range(1, t.global_batch // per + 2)])
        issues.append(SpecIssue("training.global_batch", t.global_batch,
                                f"must be divisible by dp·micro_batch = {p.dp}·{t.micro_batch} = {per}.",
                                f"use global_batch in {ok_batches}, or change dp or micro_batch."))
    if p.sp and p.tp == 1:
        issues.append(SpecIssue("parallel.sp", True, "sequence parallel needs tp > 1.",
                                "set sp = false, or tp > 1."))
    if p.tp_comm_overlap and (p.tp == 1 or not p.sp):
        issues.append(SpecIssue("parallel.tp_comm_overlap", True,
                                "TP communication/GEMM overlap needs tensor parallelism with sequence parallel "
                                f"(tp = {p.tp}, sp = {str(p.sp).lower()}; Megatron-LM's rule: the overlapped "
                                "collectives are SP's all-gathers and reduce-scatters).",
                                "set sp = true with tp > 1, or tp_comm_overlap = false."))
    if p.overlap_param_gather and (p.zero == 0 or p.dp * p.cp == 1):
        issues.append(SpecIssue("parallel.overlap_param_gather", True,
                                f"there is no parameter all-gather to overlap (zero = {p.zero}, dp·cp = "
                                f"{p.dp * p.cp}): it needs a sharded optimizer over more than one rank "
                                "(Megatron-LM: --use-distributed-optimizer).",
                                "set zero = 1 (or 2, 3) with dp > 1, or overlap_param_gather = false."))
    if p.schedule == "interleaved":
        if p.vpp < 2:
            issues.append(SpecIssue("parallel.vpp", p.vpp, "the interleaved schedule needs vpp > 1 virtual stages.",
                                    "set vpp = 2 (or more), or schedule = \"1f1b\"."))
        if p.pp < 2:
            issues.append(SpecIssue("parallel.schedule", p.schedule, "interleaving needs pp > 1.",
                                    "set schedule = \"1f1b\" or pp ≥ 2."))
        if t.global_batch % (p.dp * t.micro_batch) == 0 and spec.micro_batches % p.pp:
            issues.append(SpecIssue("training.global_batch", t.global_batch,
                                    f"the interleaved schedule needs micro-batches per step ({spec.micro_batches}) "
                                    f"divisible by pp = {p.pp} (Megatron-LM's rule).",
                                    f"use global_batch = {p.dp * t.micro_batch * p.pp * max(1, round(spec.micro_batches / p.pp))}."))
    elif p.vpp != 1:
        issues.append(SpecIssue("parallel.vpp", p.vpp, "vpp > 1 only applies to schedule = \"interleaved\".",
                                "set vpp = 1, or schedule = \"interleaved\"."))
    if t.recompute == "op" and p.cp > 1:
        issues.append(SpecIssue("training.recompute", "op",
                                f"per-op selective recompute saves the attention kernel's outputs; with cp = {p.cp} "
                                "attention is Loom's ring attention, which that policy cannot save.",
                                'use recompute = "full" or "selective" with cp > 1, or cp = 1.'))
    if sorted(p.mesh) != sorted(MESH_DIMS):
        issues.append(SpecIssue("parallel.mesh", list(p.mesh), "must name each of pp, dp, cp, tp exactly once.",
                                'use mesh = ["pp", "dp", "cp", "tp"] (outermost first; tp innermost keeps TP in a node).'))
    return issues


def check(spec: Spec) -> list[SpecIssue]:
    from .run import check_data
    issues = check_cluster(spec)
    return issues + check_parallel(spec) + (check_data(spec) if spec.data is not None else [])
