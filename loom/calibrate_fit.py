"""The fitters of `loom calibrate`: pure functions from measured points to the simulator's curves (unit-tested
on synthetic data): α-β per collective, GEMM saturation, attention efficiency."""
from __future__ import annotations

import math
from dataclasses import dataclass

# ---- fitters (pure, unit-tested on synthetic data) ---------------------------------------------------------------


def linear_fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y = a + b·x."""
    n = len(x)
    if n < 2:
        raise ValueError("a line needs two points")
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    if sxx == 0:
        raise ValueError("all x are equal")
    b = sum((a - mx) * (c - my) for a, c in zip(x, y)) / sxx
    return my - b * mx, b


@dataclass(frozen=True)
class AlphaBeta:
    alpha_s: float          # latency per step
    beta_Bps: float         # achieved bytes/s on the wire
    steps: int
    points: int

    def time(self, wire_bytes: float) -> float:
        return self.alpha_s * self.steps + wire_bytes / self.beta_Bps


def fit_alpha_beta(wire_bytes: list[float], times_s: list[float], steps: int = 1) -> AlphaBeta:
    """t = α·steps + wire/β by least squares on (wire, t); α, β floored at tiny positives (noise)."""
    a, b = linear_fit(wire_bytes, times_s)
    return AlphaBeta(max(a / steps, 1e-9), 1.0 / max(b, 1e-15), steps, len(times_s))


def fit_saturation(x: list[float], eff: list[float]) -> tuple[float, float]:
    """(e_max, x_half) of e = e_max·x/(x + x_half), from 1/e = 1/e_max + (x_half/e_max)/x."""
    a, b = linear_fit([1.0 / v for v in x], [1.0 / e for e in eff])
    if a <= 0:                     # no saturation visible in the range: the best point is the cap
        return max(eff), 0.0
    e_max = 1.0 / a
    return e_max, max(0.0, b * e_max)


def fit_attention(seqs: list[float], dims: list[float], eff: list[float]) -> tuple[float, float, float]:
    """(e_max, s_half, d_half) of e = e_max·s/(s + s_half)·d/(d + d_half): for given half constants the cap is a
    closed-form least-squares fit; the two constants come from a log grid (bounded by 4x the largest measured
    size: beyond it they are not identifiable) refined by a shrinking coordinate search."""

    def solve(sh: float, dh: float) -> tuple[float, float]:
        g = [s / (s + sh) * d / (d + dh) for s, d in zip(seqs, dims)]
        e_max = sum(e * v for e, v in zip(eff, g)) / sum(v * v for v in g)
        return sum((e - e_max * v) ** 2 for e, v in zip(eff, g)), e_max

    grid = [0.0] + [2 ** (k / 4) for k in range(0, 80)]
    cands = [(sh, dh) for sh in grid if sh <= 4 * max(seqs) for dh in grid if dh <= 4 * max(dims)]
    err, sh, dh = min((solve(a, b)[0], a, b) for a, b in cands)
    step = 2 ** 0.25
    while step > 1 + 1e-6:
        improved = False
        for a, b in ((sh * step, dh), (sh / step, dh), (sh, dh * step), (sh, dh / step)):
            if a > 4 * max(seqs) or b > 4 * max(dims):
                continue
            e = solve(a, b)[0]
            if e < err:
                err, sh, dh, improved = e, a, b, True
        if not improved:
            step = step ** 0.5
    return solve(sh, dh)[1], sh, dh


def collective_steps(kind: str, n: int) -> int:
    """Latency terms per call, as simulator/costs.py charges them."""
    log_n = max(1, math.ceil(math.log2(n)))
    return {"all_reduce": 2 * log_n, "all_gather": log_n, "reduce_scatter": log_n, "send": 1}[kind]


def wire_bytes(kind: str, n: int, nbytes: float) -> float:
    """Bytes one rank sends in one ring collective on a buffer of `nbytes` (spec/compile.py's _ring)."""
    if kind == "send":
        return nbytes
    if kind == "all_reduce":
        return 2.0 * (n - 1) / n * nbytes
    return (n - 1) / n * nbytes
