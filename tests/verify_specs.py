"""The small Llama-style spec the verify tests share (2 CPU ranks by default), with per-plan overrides."""
from __future__ import annotations

import json
import tempfile

from loom.spec.load import spec_from_dict

CACHE = tempfile.mkdtemp(prefix="loom-verify-data-")

BASE = {
    "model": {"name": "t", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn_hidden": 128, "vocab": 257,
              "seq_len": 32},
    "cluster": {"gpu": "cpu", "gpus_per_node": 2},
    "training": {"global_batch": 8, "micro_batch": 2, "precision": "fp32", "recompute": "none", "lr": 1e-3},
    "data": {"cache_dir": CACHE},
}

def make_spec(parallel: dict, **model):
    d = json.loads(json.dumps(BASE))
    parallel = dict(parallel)
    d["training"].update(parallel.pop("_training", {}))
    d["model"].update({**parallel.pop("_model", {}), **model})
    d["model"]["layers"] = 4 if parallel.get("vpp", 1) > 1 else d["model"]["layers"]
    d["parallel"] = parallel
    return spec_from_dict(d)
