"""The two in-order streams of one pipeline stage, action by action: the recurrences `fast_cost.fast_step` runs.

`_Unit` holds what one unit (one micro-batch through one chunk) costs on each stream, priced by
`fast_unit._unit`. `_forward` / `_backward` advance (compute free, comm free, last start) over one forward or
backward with the event simulator's edge rules (engine.run); `_buckets_end` closes a backward's DP bucket queue;
`_single_stage` runs them over a whole step without PP; `_period` is their steady-state time per unit under PP
(the eigenvalue of the streams' max-plus recurrence). Pure arithmetic on floats: no spec, no cost model.
"""
from __future__ import annotations


class _Unit:
    """Durations of one micro-batch through one chunk, and what the plan's tail needs."""
    __slots__ = ("t_f", "t_b", "t_r", "t_head", "tp_f", "tp_b", "tp_r", "x_f", "x_b", "g_unit", "zero3_once",
                 "first", "rest", "per_mb", "d_unit", "chunk_params", "emb_params",
                 "head_params", "root_params", "p2p", "last_light", "has_r", "x_r", "x_1", "x_2", "k",
                 "t_root", "t_gl", "n", "b_first", "b_mid", "b_end")


def _buckets_end(kf: float, s: float, t_b: float, t_all: float, t_last: float, j: int) -> float:
    """End of j bucket ops on an in-order stream free at kf, op i released when (i+1)/j of a backward started at s
    and lasting t_b is done (compile_dp._buckets' edges): the first j-1 take (t_all - t_last)/(j-1) each, the
    last t_last. The queue's end is the latest of (release of op i + all ops from i on); with equal ops before
    the last, that is op 0, op j-2 or op j-1."""
    if j == 1:
        return max(kf, s + t_b) + t_all
    d = (t_all - t_last) / (j - 1)
    return max(kf + t_all, s + t_b / j + t_all, s + t_b * (j - 1) / j + d + t_last, s + t_b + t_last)


# ---- the two in-order streams of one stage, action by action --------------------------------------------------
# compile_plan gives each rank class one compute stream (forward, recompute, backward and their TP collectives)
# and one comm stream, in program order: [ZeRO-3 gathers (root, layers)] [K/V blocks] of a forward; [ZeRO-3
# layer gathers] [recompute's K/V] [backward's K/V, dK/dV] [DP buckets] of a backward. The edges are the event
# simulator's (engine.run): an op starts when its inputs allow, a compute op fed by k pipelined blocks (K/V: one
# per layer and ring step; ZeRO-3: one per layer) starts after the first block and ends no sooner than 1/k of its
# work after the last; bucket op j of n_ops starts once (j+1)/n_ops of its backward is done; a ZeRO-3 gather
# starts no earlier than the previous forward/backward (prefetch one op ahead). These functions apply those
# rules to one action's handful of ops: (cf, kf, ps) = when the compute stream is free, when the comm stream is
# free, the start of the last forward/backward.
_NEG = float("-inf")


def _forward(u: _Unit, t_f: float, cf: float, kf: float, ps: float,
             ready: float = _NEG) -> tuple[float, float, float]:
    """`ready`: when the input arrives (the K/V exchange waits for it; under PP the activation's receive)."""
    s, floor = cf, _NEG
    if u.t_gl:                                        # ZeRO-3 without PP: root, then the layers
        g = (kf if kf > ps else ps) + u.t_root
        kf = g + u.t_gl
        x = g + u.t_gl / u.n
        s = x if x > s else s
        floor = kf + t_f / u.n
    if u.x_f:
        kf = kf if kf > ready else ready
        x = kf + u.x_f / u.k
        s = x if x > s else s
        kf += u.x_f
        x = kf + t_f / u.k
        floor = x if x > floor else floor
    e = s + t_f
    return (e if e > floor else floor) + u.tp_f, kf, s


def _backward(u: _Unit, t_b: float, cf: float, kf: float, ps: float, ftail: float,
              bk: tuple[float, float, int] | None) -> tuple[float, float, float]:
    """`ftail`: the end of this micro-batch's forward (its K/V exchanges wait for it); `bk`: the DP buckets it
    issues as (t_all, t_last, n_ops), None when this backward does not reduce."""
    s, floor = (cf if cf > ftail else ftail), _NEG
    g_end = 0.0
    if u.t_gl:                                        # ZeRO-3 without PP: the layers again
        g = kf if kf > ps else ps
        kf = g_end = g + u.t_gl
        x = g + u.t_gl / u.n                          # into the first compute op: recompute, else backward
        s = x if x > s else s
    if u.has_r:
        t_r = u.t_r
        if u.t_gl:
            floor = g_end + t_r / u.n
        if u.x_r:
            x0 = kf if kf > ftail else ftail
            x = x0 + u.x_r / u.k
            s = x if x > s else s
            kf = x0 + u.x_r
            x = kf + t_r / u.k
            floor = x if x > floor else floor
        e = s + t_r
        cf = (e if e > floor else floor) + u.tp_r
        s, floor = cf, _NEG
    elif u.t_gl:
        floor = g_end + t_b / u.n
    if u.x_1:
        x0 = kf if kf > ftail else ftail
        k = u.k
        x = x0 + u.x_1 / k
        s = x if x > s else s
        x = x0 + u.x_1 + u.x_2 / k
        s = x if x > s else s
        kf = x0 + u.x_1 + u.x_2
        x = kf + t_b / k
        floor = x if x > floor else floor
    e = s + t_b
    cf = (e if e > floor else floor) + u.tp_b
    if bk is not None and bk[0]:
        kf = _buckets_end(kf, s, t_b, bk[0], bk[1], bk[2])
    return cf, kf, s


def _repeat(step, state: tuple, count: int, exact: int = 3) -> tuple:
    """`state` after `count` applications of `step(state, i)`: the first `exact` run, the rest extrapolated at the
    last one's increments (the streams' max-plus recurrence is periodic by then)."""
    prev = state
    for i in range(min(count, exact)):
        prev, state = state, step(state, i)
    if count > exact:
        state = tuple(a + (count - exact) * (a - b) for a, b in zip(state, prev))
    return state


def _single_stage(u: _Unit, afab: bool, m: int) -> tuple[float, float]:
    """pp = 1: (end of the last backward with its TP collectives, end of the comm stream) of the whole step."""
    t_f, t_b = u.t_f + u.t_head / 3, u.t_b + 2 * u.t_head / 3     # the head is in the same ops without PP
    last = (u.first[0], u.first[3], u.first[2])
    every = last if u.per_mb else None
    if afab:
        tails = []                                    # forward i's end: backward i's K/V exchanges wait for it

        def fwd(x, i):
            tails.append(_forward(u, t_f, *x))
            return tails[-1]
        cf, kf, ps = _repeat(fwd, (0.0, 0.0, 0.0), m)
        state = _repeat(lambda x, i: _backward(u, t_b, *x, tails[i][0], every), (cf, kf, ps), m - 1)
        cf, kf, _ = _backward(u, t_b, *state, cf, last)
        return cf, kf

    def unit(x, i):
        f = _forward(u, t_f, *x)
        return _backward(u, t_b, *f, f[0], every)
    state = _repeat(unit, (0.0, 0.0, 0.0), m - 1)
    f = _forward(u, t_f, *state)
    cf, kf, _ = _backward(u, t_b, *f, f[0], last)
    return cf, kf


def _period(u: _Unit, afab: bool, bk: tuple[float, float, int] | None, head: float = 0.0,
            jit: bool = False) -> float:
    """Under PP: the steady-state time per unit of one stage whose comm stream carries K/V blocks and per-micro-
    batch buckets (`bk`: t_all, t_last, n_ops), as the eigenvalue of the streams' 2×2 max-plus recurrence
    (cf, kf) -> (cf', kf') = A ⊗ (cf, kf): the maximum cycle mean of A's graph, max(a, d, (b + c)/2) (Baccelli et
    al. 1992, "Synchronization and Linearity", ch. 3), each entry read off one evaluation with the other stream
    at −∞ (tests/test_fast_cost_families.py iterates the recurrence instead). Without a path from the comm
    stream into compute (b = −∞) the compute stream runs at its own pace a and the comm backlog shows at the end
    of the step (comm_end). AFAB: a forward's period plus a backward's. `head`: the LM head's work (forward and
    backward, 1:2) in the unit, as on the last stage. `jit`: each input arrives just as the compute stream is free
    (a stage waiting on its pipeline neighbour, as in the fill and drain), so its K/V exchange cannot be
    prefetched."""
    t_f, t_b = u.t_f + head / 3, u.t_b + 2 * head / 3

    def eig(step) -> float:
        a, c = step(0.0, _NEG)
        b, d = step(_NEG, 0.0)
        if b == _NEG:
            return a
        return max(a, d, (b + c) / 2)

    def pair(cf, kf):
        f = _forward(u, t_f, cf, kf, _NEG, cf if jit else _NEG)
        return _backward(u, t_b, *f, f[0], bk)[:2]
    if afab:
        return eig(lambda cf, kf: _forward(u, t_f, cf, kf, _NEG, cf if jit else _NEG)[:2]) + \
            eig(lambda cf, kf: _backward(u, t_b, cf, kf, _NEG, cf if jit else _NEG, bk)[:2])
    return eig(pair)
