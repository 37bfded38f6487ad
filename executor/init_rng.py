"""Counter-based initial values: element i of parameter `name` is a pure function of (seed, name, i).

So a rank computes only the elements of its own shard (a TP shard's rows or columns, a DP shard's flat range)
and still holds exactly what the single-process model holds there: the premise of the parity tests, without any
rank drawing a full tensor.

The generator (two steps, both vectorised in numpy uint64, whose arithmetic wraps modulo 2^64 by definition):
- key = the first 8 bytes of BLAKE2b("seed/name") (RFC 7693; Python's hashlib), one per tensor.
- bits(i) = mix64(key + (i + 1)·γ): SplitMix64 (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number
  generators", OOPSLA; §3: state += γ, output = mix64(state)) evaluated at counter i directly, the idea of a
  counter-based generator (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3", SC'11). γ is the
  golden-ratio gamma 0x9E3779B97F4A7C15 and mix64 Stafford's "variant 13" finaliser (shifts 30, 27, 31), both as in
  java.util.SplittableRandom. Two tensors' counter streams are the same Weyl sequence shifted by a pseudo-random
  64-bit amount: they overlap with probability about (n1 + n2) / 2^64 (negligible).
- normal(i) = Box-Muller (Box & Muller 1958) on two 24-bit uniforms taken from bits(i) (bits 40-63 and 16-39):
  z = sqrt(-2 ln u1) · cos(2π u2), u1 = (a + 1)/2^24 ∈ (0, 1], u2 = b/2^24 ∈ [0, 1). Each element uses its own
  pair (the sine half is not used), so no element depends on its neighbour. float32 throughout: 24-bit uniforms
  are exact in float32 and numpy's float32 log/cos are its SIMD kernels, 5x faster than float64 here; the radius
  is bounded by sqrt(2·24·ln 2) = 5.77σ (a tail of probability 8e-9 is cut, torch.randn's 53-bit uniforms reach
  8.5σ; torchtitan even truncates at 3σ).

Reproducibility: numpy processes every element of a contiguous float32 array with the same SIMD kernel (the tail
of an array with a masked load, not a scalar fallback), so the value does not depend on where an element sits in
a chunk; tests/test_executor_init.py checks shards against the full tensor bit for bit. Across hosts the integer
part is exact; the float32 log/cos may differ in the last bit between numpy builds or SIMD families, as
torch.randn's vectorised kernel may.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_S40, _S16, _M24 = np.uint64(40), np.uint64(16), np.uint64(0xFFFFFF)
_CHUNK = 1 << 14                 # elements per vectorised pass: temporaries stay in cache (benchmarks/init_speed.py)

# Elements drawn by this process since the last reset (tests count them: a TP rank draws only its shard).
DRAWN = {"elements": 0}


def tensor_key(seed: int, name: str) -> int:
    """The 64-bit key of parameter `name` under `seed`."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little")


def _normals(key: int, idx: np.ndarray, std: float) -> np.ndarray:
    """normal(0, std) at the flat indices `idx` (uint64, a temporary: overwritten) of the tensor with `key`:
    float32, len(idx)."""
    z = idx
    z += np.uint64(1)                               # counter i -> SplitMix64 state key + (i + 1)·γ
    z *= _GAMMA
    z += np.uint64(key)
    z ^= z >> _S30                                  # mix64 (Stafford variant 13)
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    r = (z >> _S40).astype(np.float32)              # 24 bits -> u1 = (a + 1) / 2^24 ∈ (0, 1]
    c = ((z >> _S16) & _M24).astype(np.float32)     # 24 bits -> u2 = b / 2^24 ∈ [0, 1)
    r += np.float32(1.0)
    r *= np.float32(2.0 ** -24)
    np.log(r, out=r)
    r *= np.float32(-2.0 * std * std)               # sqrt(-2 σ² ln u1) = σ · sqrt(-2 ln u1)
    np.sqrt(r, out=r)
    c *= np.float32(2.0 * math.pi * 2.0 ** -24)
    np.cos(c, out=c)
    r *= c
    DRAWN["elements"] += idx.size
    return r


def normal_flat(seed: int, name: str, start: int, stop: int, std: float, out: np.ndarray | None = None
                ) -> np.ndarray:
    """Elements [start, stop) of parameter `name`'s row-major flattening, normal(0, std), float32."""
    key = tensor_key(seed, name)
    out = np.empty(stop - start, np.float32) if out is None else out
    for a in range(start, stop, _CHUNK):
        b = min(stop, a + _CHUNK)
        out[a - start:b - start] = _normals(key, np.arange(a, b, dtype=np.uint64), std)
    return out


def normal_block(seed: int, name: str, shape: tuple[int, ...], std: float, rows: tuple[int, int] | None = None,
                 cols: tuple[int, int] | None = None, pad_rows: int = 0) -> torch.Tensor:
    """The block rows [r0, r1) × cols [c0, c1) of parameter `name` (full shape `shape`, normal(0, std)), as a new
    float32 host tensor of shape (r1 - r0, c1 - c0, *shape[2:]). Rows at or beyond shape[0] (up to
    shape[0] + pad_rows: TP vocabulary padding) are zeros. Only the block's own elements are computed."""
    n_rows = shape[0]
    inner = math.prod(shape[1:])                     # elements per row
    r0, r1 = rows if rows is not None else (0, n_rows + pad_rows)
    c0, c1 = cols if cols is not None else (0, shape[1] if len(shape) > 1 else 1)
    assert 0 <= r0 <= r1 <= n_rows + pad_rows and (cols is None or 0 <= c0 <= c1 <= shape[1]), (name, shape)
    out = torch.zeros((r1 - r0, *(() if len(shape) == 1 else (c1 - c0, *shape[2:]))), dtype=torch.float32)
    real = min(r1, n_rows)                           # rows [r0, real) exist; the rest is padding
    if real <= r0:
        return out
    if cols is None or (c0, c1) == (0, shape[1]):    # whole rows: one contiguous flat range
        normal_flat(seed, name, r0 * inner, real * inner, std, out.view(-1)[:(real - r0) * inner].numpy())
        return out
    width = math.prod(shape[2:])                     # elements per column entry (1 for a matrix)
    _fill_rows(tensor_key(seed, name), r0, real, c0 * width, (c1 - c0) * width, inner, std,
               out.view(r1 - r0, -1).numpy())
    return out


def _fill_rows(key: int, a: int, b: int, lo: int, seg: int, inner: int, std: float, out: np.ndarray) -> None:
    """Rows [a, b) of a tensor with `inner` elements per row, restricted to the row-relative flat range
    [lo, lo + seg) (a column block), into out[:b - a] (2-D, seg columns): counters row·inner + lo + j."""
    step = max(1, _CHUNK // max(seg, 1))             # whole rows per pass
    offs = np.arange(lo, lo + seg, dtype=np.uint64)
    for r in range(a, b, step):
        e = min(b, r + step)
        idx = (np.arange(r, e, dtype=np.uint64)[:, None] * np.uint64(inner) + offs[None, :]).reshape(-1)
        out[r - a:e - a] = _normals(key, idx, std).reshape(e - r, seg)


@dataclass(frozen=True)
class Init:
    """How a parameter's local tensor (a TP shard, or a whole replicated tensor) of shape `shape` is initialised:
    the constant `const`, or the block rows × cols of the full tensor `name` (shape `full`, normal(0, std)) as
    normal_block computes it (rows past full[0]: zero padding). `fill` computes any flat range of it alone, so a
    ZeRO-3 rank computes just its DP shard of the unit (executor/dp.py `_make_unit`)."""
    shape: tuple[int, ...]
    const: float | None = None
    seed: int = 0
    name: str = ""
    full: tuple[int, ...] = ()
    std: float = 0.0
    rows: tuple[int, int] = (0, 0)
    cols: tuple[int, int] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def fill(self, start: int, stop: int, out: np.ndarray) -> None:
        """Elements [start, stop) of the local tensor's row-major flattening into `out` (float32, stop - start):
        bit for bit what normal_block gives there. Scratch: one vectorised pass (_CHUNK elements)."""
        assert 0 <= start <= stop <= self.numel and out.shape == (stop - start,), (self, start, stop)
        if start == stop:
            return
        if self.const is not None:
            out[:] = self.const
            return
        inner = math.prod(self.full[1:])             # elements per row of the full tensor
        width = math.prod(self.full[2:])             # elements per column entry
        c0, c1 = self.cols if self.cols is not None else (0, self.full[1] if len(self.full) > 1 else 1)
        seg = (c1 - c0) * width                       # elements per local row
        r0, real = self.rows[0], self.full[0] * inner  # real: the first counter past the tensor (padding after)
        if seg == inner:                              # whole rows: one contiguous counter range
            a, b = r0 * inner + start, r0 * inner + stop
            m = max(a, min(b, real))
            normal_flat(self.seed, self.name, a, m, self.std, out[:m - a])
            out[m - a:] = 0.0
            return
        assert self.rows[1] <= self.full[0], self      # a column block: no padding rows (vocab is split by rows)
        key, lo = tensor_key(self.seed, self.name), c0 * width
        # up to three pieces: a partial first row, whole rows, a partial last row (each row's piece is contiguous)
        fa, la = -(-start // seg), stop // seg        # whole local rows [fa, la)
        if fa > la:                                   # inside one row
            self._row_piece(key, start // seg, start % seg, stop % seg, inner, lo, out)
            return
        head = fa * seg - start
        if head:
            self._row_piece(key, fa - 1, seg - head, seg, inner, lo, out[:head])
        _fill_rows(key, r0 + fa, r0 + la, lo, seg, inner, self.std,
                   out[head:head + (la - fa) * seg].reshape(la - fa, seg))
        if stop > la * seg:
            self._row_piece(key, la, 0, stop - la * seg, inner, lo, out[head + (la - fa) * seg:])

    def _row_piece(self, key: int, row: int, j0: int, j1: int, inner: int, lo: int, out: np.ndarray) -> None:
        """Local row `row`'s elements [j0, j1) of its column block: contiguous counters."""
        a = (self.rows[0] + row) * inner + lo
        for s in range(j0, j1, _CHUNK):
            e = min(j1, s + _CHUNK)
            out[s - j0:e - j0] = _normals(key, np.arange(a + s, a + e, dtype=np.uint64), self.std)
