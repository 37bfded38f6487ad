"""The counter-based initialiser (executor/init_rng.py) and the sharded model build (executor/model.py).

(a) a rank's shard equals the slice of the full tensor computed the same way, bit for bit: column- and row-parallel
    weights, their biases, the vocab-parallel embedding with padding rows, a tied head on another stage, blocks at
    odd offsets crossing the chunk boundaries;
(b) statistics: mean, std, and the mass within 1, 2, 3 σ against the normal law, each within 5 standard errors of
    the sample (bounds derived in `_within`); neighbouring elements and two tensors uncorrelated; each parameter
    kind has its rule's std (0.02, 0.02/sqrt(2·layers), 0.01, ones, zeros);
(c) a TP rank computes only its shard: the elements drawn, counted, are 1/tp of the single process's.
(The "no full-size tensor of a sharded parameter" check is tests/test_executor_bf16.py's init test.)
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loom.executor import init_rng
from loom.executor.comm import SINGLE, Group
from loom.executor.init_rng import DRAWN, normal_block
from loom.executor.model import BuildCtx, Decoder
from loom.spec import ModelSpec

GPT = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "ffn_hidden": 64, "vocab": 257, "seq_len": 16,
       "rope_theta": 10000.0, "bias": True}


def _params(m: ModelSpec, tp: int = 1, rank: int = 0, **kw) -> dict[str, torch.Tensor]:
    ctx = BuildCtx(m, Group("tp", None, tp, rank) if tp > 1 else SINGLE, seed=7)
    return {k: v.detach() for k, v in Decoder(ctx, **kw).named_parameters()}


# ---- (a) shards are slices of the full tensor -----------------------------------------------------------------------
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("extra", [{}, {"tied_embeddings": True, "position": "learned", "norm": "layernorm"}])
def test_tp_shards_are_slices_of_the_single_process_tensors(tp, extra):
    m = ModelSpec(**{**GPT, **extra})
    one = _params(m)
    padded = -(-m.vocab // tp) * tp
    for r in range(tp):
        mine = _params(m, tp, r)
        assert mine.keys() == one.keys()
        for k, v in mine.items():
            full = one[k]
            if k in ("embed.weight", "head_weight"):      # padded vocabulary rows, zeros past the vocabulary
                full = torch.cat([full, torch.zeros(padded - m.vocab, m.hidden)])
            dim = 1 if k.endswith(("attn.o.weight", "mlp.down.weight")) else 0
            split = k.endswith((".weight", ".bias")) and any(s in k for s in (".q.", ".k.", ".v.", ".up.", ".gate."))
            split |= k in ("embed.weight", "head_weight") or dim == 1
            want = full.chunk(tp, dim=dim)[r] if split else full
            assert torch.equal(v, want), (tp, r, k)
        if r == tp - 1:                                    # the last rank holds the padding rows: zeros
            table = mine.get("embed.weight", mine["head_weight"])   # tied: one tensor, listed as head_weight
            assert table[m.vocab - padded:].abs().sum() == 0


def test_tied_head_on_another_stage_is_the_embedding_shard():
    m = ModelSpec(**{**GPT, "tied_embeddings": True})
    for r in range(2):
        first = _params(m, 2, r, layers=range(1), first=True, last=False)
        last = _params(m, 2, r, layers=range(1, 2), first=False, last=True)
        assert torch.equal(first["embed.weight"], last["head_weight"])
    assert not torch.equal(_params(ModelSpec(**GPT))["head_weight"], _params(ModelSpec(**GPT))["embed.weight"])


@pytest.mark.parametrize("chunk", [1000, 1 << 16])
def test_blocks_at_odd_offsets_equal_the_full_tensor_bit_for_bit(monkeypatch, chunk):
    """Shards whose flat ranges start and end anywhere, through chunks of a different length than the full
    tensor's: the value of an element does not depend on its place in a vectorised pass."""
    shape = (301, 517)
    full = normal_block(3, "w", shape, 0.02)                 # the default chunking
    monkeypatch.setattr(init_rng, "_CHUNK", chunk)
    for rows, cols in [((0, 301), None), ((7, 250), None), ((7, 250), (13, 301)), ((300, 301), (0, 1)),
                       ((0, 301), (516, 517)), ((5, 6), None)]:
        got = normal_block(3, "w", shape, 0.02, rows=rows, cols=cols)
        c0, c1 = cols or (0, shape[1])
        assert torch.equal(got, full[rows[0]:rows[1], c0:c1]), (rows, cols)
    pad = normal_block(3, "w", shape, 0.02, rows=(290, 310), pad_rows=9)
    assert torch.equal(pad[:11], full[290:]) and pad[11:].abs().sum() == 0
    assert torch.equal(normal_block(3, "w", (7,), 1.0, rows=(2, 5)), normal_block(3, "w", (7,), 1.0)[2:5])


def test_the_value_depends_on_seed_and_name():
    a = normal_block(1, "layers.0.attn.q", (64, 64), 1.0)
    assert torch.equal(a, normal_block(1, "layers.0.attn.q", (64, 64), 1.0))
    assert not torch.equal(a, normal_block(2, "layers.0.attn.q", (64, 64), 1.0))
    assert not torch.equal(a, normal_block(1, "layers.0.attn.k", (64, 64), 1.0))
    # the value of element i does not depend on the declared shape: a pure function of (seed, name, i)
    assert torch.equal(a.reshape(-1)[:1000], normal_block(1, "layers.0.attn.q", (1000,), 1.0))


# ---- (b) statistics -----------------------------------------------------------------------------------------------
def _within(got: float, want: float, se: float, k: float = 5.0) -> None:
    """|got - want| <= k standard errors (5 SE: a false alarm about once in 1.7 million runs per check)."""
    assert abs(got - want) <= k * se, (got, want, se, (got - want) / se)


def test_normal_statistics_within_five_standard_errors():
    n, std = 1 << 20, 0.02
    x = normal_block(11, "stats", (n,), std).double().numpy()
    _within(x.mean(), 0.0, std / math.sqrt(n))
    # SE of the sample std of a normal sample: σ / sqrt(2(n-1)) (the chi distribution's large-n limit)
    _within(x.std(ddof=1), std, std / math.sqrt(2 * (n - 1)))
    z = np.abs(x) / std
    for k in (1, 2, 3):
        p = math.erf(k / math.sqrt(2))                       # P(|Z| < k) of the standard normal
        _within(float((z < k).mean()), p, math.sqrt(p * (1 - p) / n))
    # the 4th moment (kurtosis 3 for a normal; SE sqrt(24/n), Kendall & Stuart, sampling variance of b2)
    _within(float(((x / std) ** 4).mean() / ((x / std) ** 2).mean() ** 2), 3.0, math.sqrt(24 / n))
    # neighbours and two tensors are uncorrelated: SE of a correlation coefficient near 0 is 1/sqrt(n)
    _within(float(np.corrcoef(x[:-1], x[1:])[0, 1]), 0.0, 1 / math.sqrt(n))
    y = normal_block(11, "stats2", (n,), std).double().numpy()
    _within(float(np.corrcoef(x, y)[0, 1]), 0.0, 1 / math.sqrt(n))


def test_every_parameter_kind_gets_its_std():
    m = ModelSpec(**{**GPT, "layers": 4, "hidden": 128, "ffn_hidden": 512, "vocab": 1000, "heads": 4, "kv_heads": 4,
                     "position": "learned", "norm": "layernorm", "seq_len": 256})
    ps = _params(m)
    out = 0.02 / math.sqrt(2 * m.layers)                     # GPT-2's residual projections (Radford et al. 2019)
    for k, v in ps.items():
        if k.endswith("bias") or ".norm" in k or k.startswith("norm"):
            want = 0.0 if k.endswith("bias") else 1.0
            assert torch.all(v == want), k
            continue
        std = out if k.endswith(("attn.o.weight", "mlp.down.weight")) else 0.01 if k == "pos" else 0.02
        n = v.numel()
        _within(v.double().std().item(), std, std / math.sqrt(2 * (n - 1)))
        _within(v.double().mean().item(), 0.0, std / math.sqrt(n))


# ---- (c) a TP rank draws only its shard ---------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["rope", "learned"])
def test_a_tp4_rank_draws_a_quarter_of_the_elements(position):
    m = ModelSpec(**{**GPT, "vocab": 256, "position": position})
    DRAWN["elements"] = 0
    _params(m)
    single = DRAWN["elements"]
    pos = m.seq_len * m.hidden if position == "learned" else 0  # replicated over TP: every rank draws it
    assert single == sum(v.numel() for k, v in _params(m).items()
                         if not (k.endswith("bias") or "norm" in k))
    total = 0
    for r in range(4):
        DRAWN["elements"] = 0
        _params(m, 4, r)
        assert DRAWN["elements"] == (single - pos) // 4 + pos, (r, DRAWN["elements"], single)
        total += DRAWN["elements"] - pos
    assert total == single - pos                             # no element drawn by two ranks


# ---- ZeRO-3 from host-built parameters (BuildCtx.params_on_host; executor/dp_unit.py build_unit) -----------------------
def _units(m: ModelSpec, zero: int, dtype: torch.dtype, on_host: bool, device: str = "cpu"):
    from loom.executor.dp import DataParallel
    tp = Group("tp", None, 2, 1)
    dec = Decoder(BuildCtx(m, tp, seed=7, device=torch.device(device), params_on_host=on_host))
    return dec, DataParallel(dec, Group("dp", None, 2, 1), tp, zero, 0.01, layer_units=list(dec.layers),
                             param_dtype=dtype)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_units_from_host_built_parameters_equal_the_default_build(zero, dtype):
    """Leaving the parameters on the host changes where the values are assembled, not what the units hold: masters,
    low-precision shards, masks and parameters equal the default build bit for bit (on CPU host and device
    coincide; what reaches a CUDA device is checked by the gpu test below)."""
    m = ModelSpec(**GPT)
    (d0, a), (d1, b) = _units(m, zero, dtype, False), _units(m, zero, dtype, True)
    assert len(a.units) == len(b.units)
    for u, v in zip(a.units, b.units):
        assert u.numel == v.numel and u.offsets == v.offsets
        for x, y in ((u.shard_param, v.shard_param), (u.decay, v.decay), (u.count, v.count),
                     (u.shard_lowp, v.shard_lowp)):
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y))
        assert u.flat.dtype == v.flat.dtype == dtype
        if zero == 3:                                        # released: gathered before use
            assert u.flat.untyped_storage().nbytes() == v.flat.untyped_storage().nbytes() == 0
        else:
            assert torch.equal(u.flat, v.flat)
    for (n, p), (_, q) in zip(d0.named_parameters(), d1.named_parameters()):
        assert p.dtype == q.dtype and p.shape == q.shape, n
        if zero < 3:
            assert torch.equal(p, q), n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_zero3_from_the_host_never_puts_the_tp_shard_on_the_device():
    """ZeRO-3 over dp = 8 (bf16 parameters, fp32 masters and gradients) from host-built parameters: the device's
    peak while building is the state it keeps (this rank's DP shards: (4 + 2 + 1 + 1 + 4) / 8 = 1.5 bytes per
    parameter of the TP shard) plus at most one unit's placeholders (bf16 buffer + fp32 gradient, allocated and
    freed at once), below the fp32 TP shard (4 bytes per parameter) that the default build puts there first."""
    m = ModelSpec(**{**GPT, "layers": 8, "hidden": 512, "ffn_hidden": 2048, "heads": 8, "kv_heads": 8,
                     "vocab": 4096})
    from loom.executor.dp import DataParallel
    tp = Group("tp", None, 2, 1)
    peak, state = {}, {}
    for on_host in (False, True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        dec = Decoder(BuildCtx(m, tp, seed=7, device=torch.device("cuda"), params_on_host=on_host))
        dp = DataParallel(dec, Group("dp", None, 8, 3), tp, 3, 25, layer_units=list(dec.layers),
                          param_dtype=torch.bfloat16)
        peak[on_host] = torch.cuda.max_memory_allocated() - base
        state[on_host] = torch.cuda.memory_allocated() - base
        n_tp = sum(p.numel() for p in dec.parameters())
        biggest_unit = max(u.numel for u in dp.units)
        del dec, dp
    assert state[True] == state[False] and state[True] <= 1.6 * n_tp, (state, n_tp)
    assert peak[False] >= 4 * n_tp, (peak, n_tp)
    assert peak[True] <= state[True] + 6 * biggest_unit + 2**20 < 4 * n_tp, (peak, state, biggest_unit, n_tp)


# ---- ZeRO-3: each unit's DP shard computed straight from the initialiser (init_rng.Init) ----------------------------
@pytest.mark.parametrize("chunk", [37, 1 << 14])
def test_init_fill_of_any_flat_range_equals_normal_block(monkeypatch, chunk):
    """Init.fill(start, stop) of a block (column-parallel rows with zero padding rows, a row-parallel column block
    whose flat ranges start and end mid-row, a 3-D block, a 1-D one, a constant) equals the same elements of
    normal_block's tensor bit for bit, for random ranges, through vectorised passes of another length."""
    monkeypatch.setattr(init_rng, "_CHUNK", chunk)
    rng = np.random.default_rng(0)
    for full, rows, cols, pad in [((31, 17), (0, 31), None, 0), ((31, 17), (5, 20), None, 0),
                                  ((31, 17), (16, 32), None, 1), ((31, 17), (24, 40), None, 9),
                                  ((31, 17), (0, 31), (4, 9), 0), ((31, 17, 3), (2, 31), (4, 9), 0),
                                  ((31,), (3, 20), None, 0)]:
        ref = normal_block(3, "w", full, 0.02, rows=rows, cols=cols, pad_rows=pad).reshape(-1).numpy()
        c0, c1 = cols or (0, full[1] if len(full) > 1 else 1)
        shape = (rows[1] - rows[0], *(() if len(full) == 1 else (c1 - c0, *full[2:])))
        init = init_rng.Init(shape, seed=3, name="w", full=full, std=0.02, rows=rows, cols=cols)
        assert init.numel == ref.size
        for a, b in [(0, ref.size), (0, 0), (ref.size, ref.size)] + [sorted(rng.integers(0, ref.size + 1, 2))
                                                                      for _ in range(30)]:
            out = np.full(b - a, np.nan, np.float32)
            init.fill(int(a), int(b), out)
            assert np.array_equal(out, ref[a:b]), (full, rows, cols, a, b)
    out = np.full(5, np.nan, np.float32)
    init_rng.Init((4, 3), const=1.0).fill(3, 8, out)
    assert np.all(out == 1.0)


LLAMA = {**GPT, "bias": False}
# ffn 40: at tp 2 the DP shard boundaries of dp 2 and 4 fall mid-row in the row-parallel attn.o (dp 3: Llama's)
GPT2 = {**GPT, "position": "learned", "norm": "layernorm", "activation": "gelu", "ffn_hidden": 40}


def _zero3(m: ModelSpec, tp: int, r: int, dp: int, k: int, dtype: torch.dtype, lazy: bool, **kw):
    """(decoder, DataParallel, elements drawn) for TP rank r of tp, DP rank k of dp, ZeRO-3."""
    from loom.executor.dp import DataParallel
    g = Group("tp", None, tp, r) if tp > 1 else SINGLE
    DRAWN["elements"] = 0
    dec = Decoder(BuildCtx(m, g, sp=tp > 1, seed=7, params_on_host=lazy), **kw)
    if lazy:
        assert all(p.is_meta for p in dec.parameters())      # nothing computed or held before DataParallel
    dpw = DataParallel(dec, Group("dp", None, dp, k), g, 3, 0.01, layer_units=list(dec.layers), param_dtype=dtype)
    return dec, dpw, DRAWN["elements"]


@pytest.mark.parametrize("dp", [2, 3, 4])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model,stage", [(LLAMA, "all"), (GPT2, "all"), ({**GPT2, "tied_embeddings": True}, "last"),
                                         ({**LLAMA, "tied_embeddings": True}, "first")])
def test_zero3_shards_from_the_initialiser_equal_the_current_build(dp, tp, dtype, model, stage):
    """A deferred build (meta parameters; DataParallel computes each unit's DP shard from the initialiser) gives
    the ZeRO-3 state of the current build (TP shards computed, then split) bit for bit: fp32 masters, low-precision
    shards, decay and count masks, unit layout, SP gradient ranges; the parameters are the same objects, with their
    marks, as views of the freed placeholder. Tied embeddings on the last stage compute their rows of "embed".
    Every element is computed once in the DP group: the ranks' counts sum to the TP rank's, each at most its
    shards' length (Σ units ⌈n/dp⌉): about 1/(tp·dp) of the model."""
    m = ModelSpec(**model)
    kw = {"all": {}, "first": {"layers": range(1), "first": True, "last": False},
          "last": {"layers": range(1, 2), "first": False, "last": True}}[stage]
    for r in range(tp):
        drawn = []
        for k in range(dp):
            d0, a, n0 = _zero3(m, tp, r, dp, k, dtype, False, **kw)
            d1, b, n1 = _zero3(m, tp, r, dp, k, dtype, True, **kw)
            assert len(a.units) == len(b.units)
            for u, v in zip(a.units, b.units):
                assert (u.numel, u.offsets, u.sp_params) == (v.numel, v.offsets, v.sp_params)
                for x, y in ((u.shard_param, v.shard_param), (u.shard_lowp, v.shard_lowp), (u.decay, v.decay),
                             (u.count, v.count), (u.shard_grad, v.shard_grad)):
                    assert (x is None) == (y is None) and (x is None or (x.dtype == y.dtype and torch.equal(x, y)))
                assert v.flat.dtype == dtype and v.flat.untyped_storage().nbytes() == 0
            named0, named1 = dict(d0.named_parameters()), dict(d1.named_parameters())
            assert named0.keys() == named1.keys()
            for n, p in named1.items():
                q = named0[n]
                assert (p.shape, p.dtype, p.device, p.requires_grad) == (q.shape, q.dtype, q.device, q.requires_grad)
                assert {x: getattr(p, x) for x in ("loom_tp_split", "loom_sp_grad", "loom_decay", "loom_tp_dim")} \
                    == {x: getattr(q, x) for x in ("loom_tp_split", "loom_sp_grad", "loom_decay", "loom_tp_dim")}
                assert not hasattr(p, "loom_init") and b.unit_of[p] is not None
            if "embed" in named1 and "head_weight" in named1:       # tied on one stage: still one object
                assert (d1.head_weight is d1.embed.weight) == (d0.head_weight is d0.embed.weight)
            assert n1 <= sum(v.numel // dp for v in b.units) <= sum(p.numel() for p in d1.parameters()) / dp + \
                len(b.units), (n1, n0)
            drawn.append(n1)
        assert sum(drawn) == n0, (drawn, n0)                      # every element once in the DP group


def test_zero3_with_one_dp_rank_computes_the_whole_tp_shard_from_the_initialiser():
    """ZeRO-3 on a single DP rank (dp·cp = 1; the Trainer still defers the build): the whole unit is computed and
    the parameters are real views of it, equal to the default build's."""
    m = ModelSpec(**GPT2)
    d0, a, n0 = _zero3(m, 2, 1, 1, 0, torch.bfloat16, False)
    d1, b, n1 = _zero3(m, 2, 1, 1, 0, torch.bfloat16, True)
    assert n0 == n1
    for u, v in zip(a.units, b.units):
        assert torch.equal(u.shard_param, v.shard_param) and torch.equal(u.flat, v.flat)
    for (n, p), (_, q) in zip(d0.named_parameters(), d1.named_parameters()):
        assert torch.equal(p, q) and not q.is_meta, n
    # a write into the unit's buffer (a ZeRO-3 gather) does not bump the parameters' version counters: autograd
    # would otherwise refuse the backward of parameters saved before a re-gather
    with torch.no_grad():
        for u in b.units:
            u.flat.add_(0)
    assert all(q._version == 0 for q in d1.parameters())
