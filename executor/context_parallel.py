"""Context parallelism: split every sequence over the cp ranks and run attention as ring attention.

What changes on a cp rank (everything else of the model is per token and runs unchanged on the local tokens):
- data: ids and targets keep this rank's tokens in the layout's order (`shard_batch`; zigzag by default, see
  cp_layout.py);
- positions: RoPE rotates each token by its global position, so the cos/sin tables are gathered at this rank's
  positions; learned position embeddings read the rows of `Decoder.position_ids` (`apply_context_parallel`);
- attention: every layer's attention core becomes `ring_attention` over the cp group (cp_ring.py);
- loss: each rank sums the losses of its tokens and scales by 1 / (tokens in the global batch), like every other
  split, so gradients are summed (not averaged) over cp, together with dp (Megatron reduces over its dp×cp group).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .comm import Group
from .cp_layout import LAYOUTS, Layout, check_split, shard, token_positions, unshard, visible_block
from .cp_ring import ring_attention, simulated_ring_attention
from .pp_p2p import DEFAULT_TIMEOUT_S

__all__ = ["LAYOUTS", "Layout", "apply_context_parallel", "ring_attention", "shard", "shard_batch",
           "simulated_ring_attention", "token_positions", "unshard", "visible_block"]


def shard_batch(ids: torch.Tensor, targets: torch.Tensor, cp: Group, layout: Layout = "zigzag"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, seq) ids and targets -> this cp rank's (batch, seq / cp) tokens, in layout order."""
    if not cp.active:
        return ids, targets
    return shard(ids, 1, cp.size, cp.rank, layout), shard(targets, 1, cp.size, cp.rank, layout)


def apply_context_parallel(decoder: nn.Module, cp: Group, layout: Layout = "zigzag",
                           timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Make part 1's `executor.model.Decoder` (any stage of it) context-parallel over `cp`, in place."""
    if not cp.active:
        return
    if getattr(decoder, "loom_cp", None) is not None:
        raise ValueError("apply_context_parallel was already applied to this Decoder (its RoPE tables are gathered)")
    decoder.loom_cp = (cp.size, cp.rank, layout)
    spec = decoder.spec
    check_split(spec.seq_len, cp.size, layout)
    device = getattr(decoder, "loom_device", None) or next(decoder.parameters()).device   # ZeRO-3: still on host
    pos = token_positions(spec.seq_len, cp.size, cp.rank, layout).to(device)
    decoder.position_ids = pos                       # learned position embeddings read these rows (model.py)
    if spec.position == "rope":
        # apply_rope reads rows [0, s_local) of the tables: gather the rows of this rank's global positions.
        decoder.cos = decoder.cos[pos].contiguous()
        decoder.sin = decoder.sin[pos].contiguous()
    core = functools.partial(ring_attention, group=cp, layout=layout, causal=True, timeout_s=timeout_s)
    for layer in decoder.layers:
        layer.attn.core = core
