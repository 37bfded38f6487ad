"""Laws the memory model must obey on every valid spec (hypothesis, via loom.spec.strategies).

"Everything else fixed" means: the same model, micro-batch, global batch and dp; raising tp, pp or cp multiplies
the world size (more GPUs), so micro-batches per step and micro-batches in flight do not change. Trading dp for
tp at a fixed world size would change the number of micro-batches (and so what the pipeline holds) and the ZeRO
sharding degree at once, and then no monotone law holds.
"""
from __future__ import annotations

import copy
import json

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from loom.simulator.memory import memory_report, param_bytes
from loom.spec.units import padded_vocab
from loom.spec import Spec, spec_from_dict
from loom.spec.strategies import valid_spec_dicts, valid_specs

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rebuilt(d: dict, **parallel) -> Spec | None:
    """The spec of data `d` with other parallel degrees and the world size that makes them fit, or None
    when that is not a valid spec (hypothesis then discards the example)."""
    d = copy.deepcopy(d)
    d["parallel"].update(parallel)
    p = d["parallel"]
    world = p["dp"] * p["tp"] * p["pp"] * p["cp"]
    d["cluster"].update(gpus_per_node=8 if world % 8 == 0 else world, nodes=world // 8 if world % 8 == 0 else 1)
    try:
        return spec_from_dict(d)
    except Exception:      # noqa: BLE001 - SpecError: the larger degree does not divide the model
        return None


def growable(d: dict, dim: str, k: int) -> dict:
    """A copy of `d` whose model admits `dim` multiplied by k: for tp, heads, kv_heads, hidden and ffn scaled by
    k; for pp, layers scaled by k; for cp (and tp under sp), a sequence length divisible by the larger split.
    Both the original degree and the k-times larger one are then valid on the same model."""
    d = copy.deepcopy(d)
    m, p = d["model"], d["parallel"]
    if dim == "tp":
        for f in ("heads", "kv_heads", "hidden", "ffn_hidden"):
            m[f] *= k
    if dim == "pp":
        m["layers"] *= k
        if p["schedule"] == "interleaved":
            p["schedule"], p["vpp"] = "1f1b", 1
    need = 2 * p["cp"] * (k if dim == "cp" else 1) * (p["tp"] * (k if dim == "tp" else 1) if p["sp"] else 1)
    m["seq_len"] = max(need, m["seq_len"] - m["seq_len"] % need)
    return d


def peak(spec: Spec) -> int:
    return memory_report(spec).peak_bytes


@FAST
@given(valid_specs())
def test_every_valid_spec_simulates(spec):
    r = memory_report(spec)
    assert len(r.per_stage) == spec.plan.pp
    for s in r.per_stage:
        d = s.to_dict()
        assert all(v >= 0 for k, v in d.items() if k != "stage")
        assert s.peak >= s.model_states + s.activations
    json.dumps(r.to_dict())
    assert r.fits == (r.peak_bytes <= r.hbm_bytes)


@FAST
@given(valid_spec_dicts())
def test_zero_never_increases_model_states_and_0_to_2_never_increase_the_peak(d):
    """ZeRO-3's gathered-parameter buffers can outweigh its savings when a stage holds few layers (true of
    real FSDP too), so for the peak the law is stated for stages 0 → 1 → 2; model states shrink at every step.
    Under pipelining the plan reduces ZeRO-2 gradients once per step, so the unsharded accumulation buffer
    stays and ZeRO-2 saves nothing over ZeRO-1 (why DeepSpeed refuses ZeRO-2 with PP): there the law is 0 → 1."""
    specs = [rebuilt(d, zero=z) for z in range(4)]
    assume(None not in specs)          # e.g. overlap_param_gather needs zero >= 1: no ZeRO-0 spec to compare
    reports = [memory_report(s) for s in specs]
    states = [max(s.model_states for s in r.per_stage) for r in reports]
    assert states == sorted(states, reverse=True)
    peaks = [r.peak_bytes for r in reports[:3 if d["parallel"]["pp"] == 1 else 2]]
    assert peaks == sorted(peaks, reverse=True)


@FAST
@given(valid_spec_dicts(), st.sampled_from([2, 4]))
def test_more_tp_never_increases_memory_per_gpu(d, k):
    """Every term either divides by tp or stays (replicated norms, unsharded residual tensors without SP)."""
    d = growable(d, "tp", k)
    big = rebuilt(d, tp=d["parallel"]["tp"] * k)
    assume(big is not None)
    assert peak(big) <= peak(spec_from_dict(d))


@FAST
@given(valid_spec_dicts(), st.sampled_from([2, 4]))
def test_more_cp_never_increases_memory_per_gpu(d, k):
    """Activations, logits and ring buffers scale with the local sequence; ZeRO state with 1/(dp·cp).
    Stated for dp > 1: with dp = cp = 1 there are no gradient buckets yet, and cp = 2 adds them."""
    assume(d["parallel"]["dp"] > 1)
    d = growable(d, "cp", k)
    big = rebuilt(d, cp=d["parallel"]["cp"] * k)
    assume(big is not None)
    assert peak(big) <= peak(spec_from_dict(d))


@FAST
@given(valid_spec_dicts(), st.sampled_from([2, 4]))
def test_more_pp_never_increases_states_plus_activations(d, k):
    """For AFAB and 1F1B, each new stage j holds a subset of old stage ⌊j/k⌋'s parameters and at most as many
    layer-micro-batches (min(k·pp − j, m)·L/(k·pp) ≤ min(pp − ⌊j/k⌋, m)·L/pp). Not stated for the whole peak:
    the first stage's token-id buffers grow with the micro-batches in flight, ZeRO-3 under pp > 1 keeps the
    stage's gathered parameters, and interleaving's in-flight factor 1 + (pp−1)/(pp·vpp) grows with pp."""
    d = growable(d, "pp", k)
    big = rebuilt(d, pp=d["parallel"]["pp"] * k)
    assume(big is not None)

    def worst(spec: Spec) -> int:
        return max(s.model_states + s.activations for s in memory_report(spec).per_stage)
    assert worst(big) <= worst(spec_from_dict(d))


@FAST
@given(valid_spec_dicts())
def test_afab_never_holds_less_activation_memory_than_1f1b(d):
    assume(d["parallel"]["schedule"] != "interleaved")
    afab, one = rebuilt(d, schedule="afab"), rebuilt(d, schedule="1f1b")
    for a, b in zip(memory_report(afab).per_stage, memory_report(one).per_stage):
        assert a.activations >= b.activations and a.logits_buffers >= b.logits_buffers


@FAST
@given(valid_specs())
def test_parameters_summed_over_all_ranks(spec):
    """Σ over every rank of its parameter bytes = replicas × (the model's parameters + what the layout adds),
    derived independently of the code:
      + (tp − 1) copies of everything TP replicates: per layer two norms and (with biases) the two row-parallel
        biases, the final norm, learned position embeddings;
      + the vocabulary padding rows (V_pad − V)·h of each vocabulary-parallel table: the embedding, and the head
        when untied, or the tied copy on the last stage when pp > 1;
      + that tied copy itself (V·h) when pp > 1.
    Replicas: dp·cp when zero < 3; with ZeRO-3 each element lives once across dp·cp ranks. Every flat unit (DP
    bucket, or ZeRO-3 layer/root) is padded to a multiple of dp·cp (executor/dp.py, counted by the memory model):
    fewer than dp·cp extra elements per unit and rank."""
    m, p = spec.model, spec.plan
    h = m.hidden
    replicated = m.layers * (2 * m.norm_params() + (2 * h if m.bias else 0)) + m.norm_params() \
        + (m.seq_len * h if m.position == "learned" else 0)
    tables = 1 + (1 if (not m.tied_embeddings or p.pp > 1) else 0)
    pad = (padded_vocab(m.vocab, p.tp) - m.vocab) * h * tables
    tied_copy = m.vocab * h if (m.tied_embeddings and p.pp > 1) else 0
    per_replica = m.param_count() + (p.tp - 1) * replicated + pad + tied_copy

    r = memory_report(spec)
    elem = param_bytes(spec.training.precision)
    total = sum(s.params for s in r.per_stage) * p.tp * p.dp * p.cp // elem
    n_dp = p.dp * p.cp
    # units per rank: at most one per parameter tensor (a layer has at most 18: two norms of 2, q/k/v/o, up, gate,
    # down and their biases; plus position table, embedding, head and the final norm's 2)
    tensors = m.layers * 18 + 5
    slack = 0 if n_dp == 1 else p.tp * tensors * n_dp      # per replica, summed over its tp ranks
    if p.zero < 3:
        assert per_replica * n_dp <= total <= (per_replica + slack) * n_dp
    else:
        assert per_replica <= total < per_replica + slack + p.pp * p.tp * n_dp
