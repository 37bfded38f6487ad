"""Pipeline schedules: every schedule the generators produce is complete, ordered and deadlock-free."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from loom.spec.schedules import Action, ScheduleError, build_schedule, validate_schedule


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(["afab", "1f1b", "interleaved"]), st.integers(1, 6), st.integers(1, 8), st.integers(2, 4))
def test_generated_schedules_are_valid(kind, p, m, v):
    if kind == "interleaved":
        m = m * p
    else:
        v = 1
    sched = build_schedule(kind, p, m, v)
    trace = validate_schedule(sched, m, v)
    # Cross-stage order of the witness execution: F of virtual stage j+1 after F of j, B reversed.
    pos = {(s, a.kind, a.microbatch, a.chunk): i for i, (s, a) in enumerate(trace)}
    for i in range(m):
        for j in range(p * v - 1):
            s0, c0, s1, c1 = j % p, j // p, (j + 1) % p, (j + 1) // p
            assert pos[(s0, "F", i, c0)] < pos[(s1, "F", i, c1)]
            assert pos[(s1, "B", i, c1)] < pos[(s0, "B", i, c0)]


def test_1f1b_warmup_and_afab_order():
    one = build_schedule("1f1b", 4, 8)
    kinds = [a.kind for a in one[0] if a.kind in "FB"]
    assert kinds[:4] == ["F", "F", "F", "F"] and kinds[4] == "B"      # p-s-1 = 3 warm-up forwards, then 1F1B
    last = [a.kind for a in one[3] if a.kind in "FB"]
    assert last[:4] == ["F", "B", "F", "B"]
    afab = [a.kind for a in build_schedule("afab", 4, 8)[1] if a.kind in "FB"]
    assert afab == ["F"] * 8 + ["B"] * 8


def test_validator_catches_fifo_mismatch_and_deadlock():
    sched = build_schedule("1f1b", 2, 2)
    # Stage 1 receives micro-batch 1 before micro-batch 0: message order differs.
    s1 = list(sched[1])
    i0 = s1.index(Action("RECV_ACT", 0, 0, 0))
    i1 = s1.index(Action("RECV_ACT", 1, 0, 0))
    s1[i0], s1[i1] = s1[i1], s1[i0]
    with pytest.raises(ScheduleError):
        validate_schedule([sched[0], s1], 2)
    # Stage 0 waits for a gradient before sending the activation that produces it: deadlock.
    s0 = [Action("F", 0), Action("RECV_GRAD", 0, 0, 1), Action("SEND_ACT", 0, 0, 1), Action("B", 0)]
    s1 = [Action("RECV_ACT", 0, 0, 0), Action("F", 0), Action("B", 0), Action("SEND_GRAD", 0, 0, 0)]
    with pytest.raises(ScheduleError, match="deadlock"):
        validate_schedule([s0, s1], 1)
    with pytest.raises(ScheduleError):
        build_schedule("interleaved", 4, 6, 2)          # m not divisible by p
