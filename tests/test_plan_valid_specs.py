"""Every valid spec (loom.spec.strategies) compiles to a sound plan that simulates to a sane report."""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings

from loom.spec import compile_plan, validate_schedule
from loom.spec.strategies import valid_specs
from loom.simulator import simulate_time


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_specs())
def test_valid_specs_compile_conserve_flops_and_simulate(spec):
    plan = compile_plan(spec)
    want = spec.model.train_flops_per_token(spec.training.recompute) * spec.tokens_per_step
    assert plan.total_flops() == pytest.approx(want, rel=1e-9)
    v = spec.plan.vpp if spec.plan.schedule == "interleaved" else 1
    validate_schedule(plan.schedule, spec.micro_batches, v)
    assert len(plan.topological_order()) == len(plan)              # acyclic
    r = simulate_time(spec, plan)
    assert math.isfinite(r.step_time_s) and r.step_time_s > 0
    assert 0 < r.hfu <= 1 and 0 <= r.bubble_fraction < 1
    assert all(x >= 0 for x in r.exposed_comm_s.values())
