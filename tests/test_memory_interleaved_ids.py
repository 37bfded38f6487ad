"""Stage 0's token-id buffers: the memory model counts the micro-batches whose first-chunk forward has run and whose
first-chunk backward has not. Checked against an independent count: walk each stage's program from
spec/schedules.py (build_schedule, with its sends and receives) and track the live chunk-0 forwards."""
from __future__ import annotations

import pytest

from loom.simulator.activations import TOKEN_ID_BYTES, first_chunk_microbatches_in_flight
from loom.simulator.memory import memory_report
from loom.spec import spec_from_dict
from loom.spec.schedules import build_schedule


def walked_chunk0_peak(kind: str, p: int, m: int, stage: int, v: int) -> int:
    """Most chunk-0 forwards alive at once on `stage`: +1 at F of chunk 0, −1 at its B, in program order."""
    live = peak = 0
    for a in build_schedule(kind, p, m, v)[stage]:
        if a.chunk == 0 and a.kind in ("F", "B"):
            live += 1 if a.kind == "F" else -1
            assert live >= 0
            peak = max(peak, live)
    return peak


CASES = ([("afab", p, m, 1) for p in (1, 2, 4) for m in (1, 3, 8)]
         + [("1f1b", p, m, 1) for p in (1, 2, 3, 4, 8) for m in (1, 2, 5, 8, 16)]
         + [("interleaved", p, m, v) for p in (1, 2, 3, 4, 6) for v in (1, 2, 3, 4)
            for m in (p, 2 * p, 3 * p, 5 * p)])


@pytest.mark.parametrize("kind, p, m, v", CASES)
def test_first_chunk_count_equals_the_walked_schedule(kind, p, m, v):
    for s in range(p):
        assert first_chunk_microbatches_in_flight(kind, p, s, m, v) == walked_chunk0_peak(kind, p, m, s, v), s


def test_hand_counted_pp2_vpp2_m4():
    """Stage 0 of pp2 vpp2 with 4 micro-batches runs F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 ...: four
    chunk-0 forwards are alive before B0.0, where the old whole-stage rounding (5 chunk forwards · 1/2 -> 3) said 3."""
    order = [f"{a.kind}{a.microbatch}.{a.chunk}" for a in build_schedule("interleaved", 2, 4, 2)[0]
             if a.kind in ("F", "B")]
    assert order[:10] == ["F0.0", "F1.0", "F0.1", "F1.1", "F2.0", "B0.1", "F3.0", "B1.1", "F2.1", "B0.0"]
    assert first_chunk_microbatches_in_flight("interleaved", 2, 0, 4, 2) == 4


MODEL = {"layers": 4, "hidden": 32, "heads": 4, "kv_heads": 2, "ffn_hidden": 64, "vocab": 258, "seq_len": 16}


@pytest.mark.parametrize("pp, vpp, m", [(2, 2, 4), (2, 2, 2), (4, 2, 8), (2, 1, 4)])
def test_stage0_embedding_buffers_are_the_walked_count_of_token_ids(pp, vpp, m):
    """The memory model's stage-0 embedding buffers (no dropout: token ids only) = walked peak × ids bytes."""
    layers = 2 * pp * vpp
    b = 2
    spec = spec_from_dict({"model": {**MODEL, "layers": layers}, "cluster": {"gpu": "cpu", "gpus_per_node": pp},
                           "training": {"global_batch": m * b, "micro_batch": b, "precision": "fp32"},
                           "parallel": {"pp": pp, "vpp": vpp, "schedule": "interleaved" if vpp > 1 else "1f1b"}})
    assert spec.micro_batches == m
    kind = spec.plan.schedule
    st0 = memory_report(spec).per_stage[0]
    assert st0.embedding_buffers == walked_chunk0_peak(kind, pp, m, 0, vpp) * TOKEN_ID_BYTES * b * MODEL["seq_len"]
