"""The optional [data] and [run] tables: what the executor trains on and how a run is driven.

[data] mixture maps a source to a weight. A source is a built-in corpus built offline from this machine's Python
standard library ("stdlib_code": its .py sources; "stdlib_docs": the reference documentation text shipped in
pydoc_data) or a directory of pre-tokenized shards (meta.json + *.bin, see docs/executor.md). decay_mixture, if
given, replaces the mixture for the decay phase of a WSD schedule (e.g. higher-quality data while the LR anneals,
as in MiniCPM, Hu et al. 2024 §4.3).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt

BUILTIN_SOURCES = ("stdlib_code", "stdlib_docs")


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    mixture: dict[str, PositiveFloat] = Field(default_factory=lambda: {"stdlib_code": 1.0})
    decay_mixture: dict[str, PositiveFloat] | None = None
    tokenizer: Literal["byte"] = "byte"          # bytes 0-255 plus EOS = 256 (vocab 257)
    cache_dir: str = "data_cache"                 # where built-in corpora are tokenized to (memmap shards)


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: PositiveInt | None = None               # None: training.tokens / tokens_per_step
    log_every: PositiveInt = 1
    checkpoint_every: NonNegativeInt = 0           # 0: only at the end (when out_dir is set)
    out_dir: str | None = None                     # checkpoints and metrics.jsonl; None: nothing written
    resume: bool = True                            # continue from the newest checkpoint in out_dir


BYTE_VOCAB = 257                                   # the byte tokenizer: 256 byte values + EOS


def check_data(spec) -> list:
    """Cross-field checks of [data] (returns SpecIssues): sources exist, the model's vocabulary covers the
    tokenizer's, and a decay mixture has a decay phase to apply to."""
    import json
    import os

    from .errors import SpecIssue
    d = spec.data
    if d is None:
        d = DataSpec()
    issues = []
    for table, mix in (("data.mixture", d.mixture), ("data.decay_mixture", d.decay_mixture or {})):
        if table == "data.mixture" and not mix:
            issues.append(SpecIssue(table, mix, "the mixture is empty.", 'use mixture = {stdlib_code = 1.0}.'))
        for src in mix:
            if src in BUILTIN_SOURCES:
                if spec.model.vocab < BYTE_VOCAB:
                    issues.append(SpecIssue("model.vocab", spec.model.vocab,
                                            f"the byte tokenizer of source {src!r} needs {BYTE_VOCAB} token ids.",
                                            f"set model.vocab >= {BYTE_VOCAB}."))
                continue
            meta = os.path.join(os.path.expanduser(src), "meta.json")
            if not os.path.isfile(meta):
                issues.append(SpecIssue(f"{table}.{src}", src,
                                        "is neither a built-in source nor a directory with meta.json.",
                                        f"use one of {list(BUILTIN_SOURCES)} or a shard directory "
                                        "(meta.json + *.bin; docs/executor.md)."))
                continue
            try:
                vocab = int(json.load(open(meta))["vocab_size"])
            except (OSError, ValueError, KeyError, TypeError):
                issues.append(SpecIssue(f"{table}.{src}", meta, "meta.json needs an integer vocab_size.",
                                        'write {"dtype": "uint16", "vocab_size": N, "eos_id": E}.'))
                continue
            if vocab > spec.model.vocab:
                issues.append(SpecIssue("model.vocab", spec.model.vocab,
                                        f"source {src!r} has token ids up to {vocab - 1}.",
                                        f"set model.vocab >= {vocab}."))
    if d.decay_mixture and spec.training.lr_schedule != "wsd":
        issues.append(SpecIssue("data.decay_mixture", d.decay_mixture,
                                "a decay mixture applies to the decay phase of a WSD schedule.",
                                'set training.lr_schedule = "wsd", or remove data.decay_mixture.'))
    return issues
