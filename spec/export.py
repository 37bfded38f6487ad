"""`loom export`: a spec's model and plan as Megatron-LM arguments or a torchtitan job config (TOML).

Names were checked against the frameworks' own sources:
- Megatron-LM `megatron/training/arguments.py` at d98e8a64 (2026-08-22), whose arguments are partly generated from
  config dataclasses (`ArgumentGroupFactory`, `megatron/training/argument_utils.py`: field `foo_bar` becomes
  `--foo-bar`; a bool defaulting to True becomes `--no-foo-bar`/`--disable-foo-bar`, or its `argparse_meta` name),
  i.e. `megatron/core/transformer/transformer_config.py`, `megatron/core/model_parallel_config.py`,
  `megatron/training/config/{training_config,common_config}.py`. `MEGATRON_FLAGS` lists every flag emitted here.
- torchtitan `torchtitan/config/job_config.py` at e347b1e5 (2026-02-15), the last version configured by TOML
  (later commits moved to Python config functions). Its `ConfigManager._dict_to_dataclass` rejects unknown keys,
  so only real keys are emitted (`TORCHTITAN_KEYS`); the model's dimensions, which torchtitan takes from a named
  flavor (`torchtitan/models/llama3/__init__.py`, `llama3_args`), are given as a `TransformerModelArgs(...)`
  entry to register, in a comment.

How Loom's ZeRO stages map:
- Megatron-LM: zero 1 -> `--use-distributed-optimizer` (optimizer state and fp32 master weights sharded over DP,
  gradients reduce-scattered). zero 2 / 3 -> Megatron-FSDP (`--use-megatron-fsdp`) with
  `--data-parallel-sharding-strategy optim_grads` / `optim_grads_params`.
- torchtitan has FSDP2 (`fully_shard`) over `data_parallel_shard_degree` and DDP over
  `data_parallel_replicate_degree`: zero 3 -> shard = dp (FSDP2 reshards parameters after forward = ZeRO-3);
  zero 2 -> shard = dp with `fsdp_reshard_after_forward = "never"` (parameters stay gathered from forward to
  backward: ZeRO-2's memory and traffic); zero 1 -> the same as zero 2 (approximation: torchtitan has no
  optimizer-only sharding; ZeRO-2 holds less memory than ZeRO-1 with the same reduce-scatter + all-gather
  traffic); zero 0 -> replicate = dp (DDP).
"""
from __future__ import annotations

import math

from .compile import split_layers
from .errors import SpecError, SpecIssue
from .spec import Spec

LR_STYLE = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}   # Megatron's --lr-decay-style, torchtitan's


def _weighted_split(layers: int, chunks: int) -> list[int]:
    """Layers per virtual stage when the embedding and the loss/head each count as one layer, extra layers going
    to the first stages: torchtitan's generate_llm_fqn_per_model_part (torchtitan/distributed/pipeline_parallel.py,
    input_weight = output_weight = 1) and Megatron-LM's --account-for-{embedding,loss}-in-pipeline-split."""
    per, extra = divmod(layers + 2, chunks)
    counts = [per + (1 if k < extra else 0) for k in range(chunks)]
    counts[0] -= 1
    counts[-1] -= 1
    return counts


def _uneven_matches(layers: int, chunks: int) -> bool:
    """Whether the frameworks' weighted split gives exactly Loom's uneven split (compile.split_layers)."""
    return _weighted_split(layers, chunks) == [len(r) for r in split_layers(layers, chunks)]


def _train_iters(spec: Spec) -> int | None:
    t = spec.training.tokens
    return max(1, math.ceil(t / spec.tokens_per_step)) if t else None


def _check_plan(spec: Spec, target: str) -> None:
    if spec.parallel == "auto":
        raise SpecError([SpecIssue("parallel", "auto", f"export to {target} needs a concrete plan.",
                                   "resolve it first (loom search, or resolve_auto(spec)), or write a "
                                   "[parallel] table.")])



# The two targets live in their own modules; import them from here.
from .export_megatron import (MEGATRON_FLAGS, export_megatron, megatron_args, model_from_megatron,  # noqa: E402
                              parse_megatron_args)
from .export_torchtitan import (TORCHTITAN_KEYS, export_torchtitan, model_from_torchtitan,  # noqa: E402
                                parse_torchtitan, torchtitan_config, torchtitan_ffn)

__all__ = ["MEGATRON_FLAGS", "TORCHTITAN_KEYS", "export_megatron", "export_torchtitan", "megatron_args",
           "model_from_megatron", "model_from_torchtitan", "parse_megatron_args", "parse_torchtitan",
           "torchtitan_config", "torchtitan_ffn"]
