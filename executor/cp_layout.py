"""Which tokens of a sequence each context-parallel rank holds, and which key blocks its queries see.

Layouts (seq split into chunks; rank r of n):
- "contiguous": n chunks, rank r holds chunk r. Causal work is unbalanced (rank n-1 sees every key).
- "zigzag": 2n chunks, rank r holds chunks r and 2n-1-r (Brandon et al. 2023, "Striped Attention" §3 discusses
  the imbalance; the zigzag pairing is the one of Megatron-LM/TransformerEngine's `get_batch_on_this_cp_rank`).
  Every rank then does the same causal work.

Block visibility under the causal mask, for the queries of rank r and the keys that arrive from rank s
(derived from the chunk positions; checked against a dense mask in tests/test_executor_cp.py):
- s == r: the local block, causal (local tokens are in increasing position order in both layouts).
- contiguous, s < r: all queries see all keys; s > r: nothing.
- zigzag, s < r: chunk s precedes both of r's chunks, chunk 2n-1-s follows both: all queries see the first half
  of the keys. s > r: chunk r precedes both of s's chunks, chunk 2n-1-r follows both: the second half of the
  queries sees all keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Layout = Literal["contiguous", "zigzag"]
LAYOUTS = ("contiguous", "zigzag")


def check_split(seq_len: int, cp: int, layout: Layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"context-parallel layout must be one of {LAYOUTS}, got {layout!r}")
    parts = cp * (2 if layout == "zigzag" else 1)
    if seq_len % parts:
        raise ValueError(f"seq_len {seq_len} must be divisible by {parts} for cp={cp} with the {layout} layout "
                         f"(fix: choose seq_len a multiple of {parts})")


def token_positions(seq_len: int, cp: int, rank: int, layout: Layout) -> torch.Tensor:
    """Global positions (int64) of the tokens rank `rank` holds, in local order."""
    check_split(seq_len, cp, layout)
    if layout == "contiguous":
        c = seq_len // cp
        return torch.arange(rank * c, (rank + 1) * c)
    c = seq_len // (2 * cp)
    return torch.cat((torch.arange(rank * c, (rank + 1) * c),
                      torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)))


def shard(x: torch.Tensor, dim: int, cp: int, rank: int, layout: Layout) -> torch.Tensor:
    """This rank's tokens of `x` along `dim` (the full sequence)."""
    idx = token_positions(x.shape[dim], cp, rank, layout).to(x.device)
    return x.index_select(dim, idx)


def unshard(parts: list[torch.Tensor], dim: int, layout: Layout) -> torch.Tensor:
    """Inverse of `shard`: the full sequence from every rank's part (tests, debugging)."""
    cp = len(parts)
    local = parts[0].shape[dim]
    full_len = local * cp
    out = parts[0].new_empty((*parts[0].shape[:dim], full_len, *parts[0].shape[dim + 1:]))
    for r, p in enumerate(parts):
        out.index_copy_(dim, token_positions(full_len, cp, r, layout).to(p.device), p)
    return out


@dataclass(frozen=True)
class Block:
    """Attention of queries[q] on keys[k] (slices of the local sequence), causal or full."""
    q: slice
    k: slice
    causal: bool


def visible_block(rank: int, src: int, local_len: int, layout: Layout, causal: bool = True) -> Block | None:
    """What rank `rank`'s queries compute against the key/value block that came from rank `src` (None: nothing)."""
    every = slice(0, local_len)
    if not causal:
        return Block(every, every, False)
    if src == rank:
        return Block(every, every, True)
    half = local_len // 2
    if layout == "contiguous":
        return Block(every, every, False) if src < rank else None
    if src < rank:
        return Block(every, slice(0, half), False)
    return Block(slice(half, local_len), every, False)
