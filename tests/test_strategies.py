"""loom.spec.strategies: what it draws is valid (or, for invalid_specs, rejected at the named field), and
loom.spec never imports hypothesis."""
from __future__ import annotations

import subprocess
import sys

from hypothesis import given, settings

from loom.spec import ClusterSpec, ModelSpec, ParallelSpec, Spec, spec_from_dict
from loom.spec.strategies import clusters, models, plans, valid_spec_dicts, valid_specs
from loom.spec.validate import check

FAST = settings(max_examples=60, deadline=None)


def test_loom_spec_does_not_import_hypothesis():
    code = "import sys, loom.spec; print('hypothesis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@FAST
@given(valid_specs())
def test_valid_specs_pass_every_check(spec):
    assert isinstance(spec, Spec) and check(spec) == []
    assert spec.plan.size == spec.world_size
    assert spec.micro_batches * spec.plan.dp * spec.training.micro_batch == spec.training.global_batch


@FAST
@given(valid_spec_dicts())
def test_valid_spec_dicts_round_trip(d):
    spec = spec_from_dict(d)
    again = spec_from_dict(spec.model_dump(mode="json", exclude_none=True))
    assert again == spec


@FAST
@given(models(), clusters())
def test_models_and_clusters(model, cluster):
    assert isinstance(model, ModelSpec) and isinstance(cluster, ClusterSpec)
    assert model.hidden % model.heads == 0 and model.heads % model.n_kv_heads == 0
    assert cluster.resolve_gpu().hbm_bytes > 0


@FAST
@given(models().flatmap(lambda m: plans(m).map(lambda p: (m, p))))
def test_plans_fit_their_model(mp):
    m, p = mp
    assert isinstance(p, ParallelSpec)
    assert m.heads % p.tp == 0 and m.n_kv_heads % p.tp == 0 and m.ffn_hidden % p.tp == 0
    assert m.layers % (p.pp * p.vpp) == 0
    assert (p.schedule == "interleaved") == (p.vpp > 1)
