"""One rank's parameter tensors of a model chunk, and their grouping into the flat, padded DP units whose
gradients are reduced (and, with ZeRO, whose parameters are gathered): the bytes the DP/ZeRO collectives carry.

Tensors (Megatron-LM tensor parallelism, Shoeybi et al. 2019 §3; executor/model.py, tp.py): per layer norm1, q, k,
v, o, norm2, up, [gate], down in registration order; Q/K/V and up/gate split by output rows over tp (their biases
too), o/down by input columns (their biases replicated, as Megatron's RowParallelLinear); norms and the learned
position table replicated; the embedding and the LM head vocabulary-parallel, the vocabulary padded up to a
multiple of tp (Megatron pads to 128·tp; Loom only as far as the split needs, as simulator/memory.py). With tied
embeddings under PP the last stage holds its own copy of the table (Megatron's word_embeddings_for_head). A
chunk's own parameters (pos, head_weight) come before its submodules' (torch `parameters()` order).

Units: buckets of parameters in reverse order that close at a parameter boundary once their gradient bytes reach
bucket_MB (PyTorch DDP's reducer, Li et al. 2020 §3.2.3; Megatron-LM core/distributed/param_and_grad_buffer.py);
ZeRO-3: one unit per layer plus one root unit (embedding, final norm, head; FSDP's per-layer wrapping). Every unit
is padded to a multiple of the DP group size so that it splits into equal shards (executor/dp.py; Megatron-LM's
distributed optimizer pads each bucket "to ensure uniform sharding", to a multiple of lcm(dp, 128):
param_and_grad_buffer.py `_pad_end_of_bucket_if_needed`): the padding goes over the wire, so the plan counts it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Param:
    numel: int                     # this TP rank's elements
    sp_grad: bool = False          # replicated over TP but with SP its gradient is a partial sum over tp
    # What the tensor is, for checkpoint resharding (executor/reshard.py); left out of equality and hashing so
    # that the plan compiler's and memory model's comparisons and caches see only the sizes, as before.
    name: str = field(default="", compare=False)          # the single process's name ("layers.3.attn.q.weight")
    shape: tuple[int, ...] = field(default=(), compare=False)   # full: unsharded, vocabulary unpadded
    split: int | None = field(default=None, compare=False)      # TP split dim (0 rows, 1 columns), None: replicated
    vocab_padded: bool = field(default=False, compare=False)    # rows padded to padded_vocab(shape[0], tp) first


@dataclass(frozen=True)
class Unit:
    numel: int                     # padded to a multiple of the DP group
    params: tuple[Param, ...]


def padded_vocab(vocab: int, tp: int) -> int:
    return -(-vocab // tp) * tp


def chunk_tensors(m, tp: int, sp: bool, layers: range, first: bool, last: bool) -> list[Param]:
    """This rank's parameter tensors of one chunk (ModelSpec `m`), in `dict.fromkeys(decoder.parameters())` order,
    named as the single-process model names them (layers by their global index; Trainer.full_state)."""
    h = m.hidden
    sp = sp and tp > 1
    table = padded_vocab(m.vocab, tp) // tp * h
    vocab = dict(shape=(m.vocab, h), split=0, vocab_padded=True)

    def rep(name: str, *shape: int, sp_grad: bool = sp) -> Param:        # replicated over TP
        return Param(_prod(shape), sp_grad, name, shape, None)

    def col(name: str, out: int, inp: int | None) -> Param:               # split by output rows (dim 0)
        shape = (out, inp) if inp else (out,)
        return Param(out // tp * (inp or 1), False, name, shape, 0)

    own: list[Param] = []                                   # the chunk's own: pos, head_weight
    if first and m.position == "learned":
        own.append(rep("pos", m.seq_len, h))
    if last:
        own.append(Param(table, name="head_weight", **vocab))   # tied on a single stage: the embedding itself
    subs: list[Param] = []
    if first and not (last and m.tied_embeddings):
        subs.append(Param(table, name="embed.weight", **vocab))  # (else the same tensor as head_weight)

    def norm(prefix: str) -> list[Param]:
        return [rep(prefix + ".weight", h)] + ([rep(prefix + ".bias", h)] if m.norm == "layernorm" else [])

    for i in layers:
        a, f = f"layers.{i}.attn.", f"layers.{i}.mlp."
        subs += norm(f"layers.{i}.norm1")
        for n, out_dim in (("q", m.q_dim), ("k", m.kv_dim), ("v", m.kv_dim)):     # column-parallel
            subs.append(col(a + n + ".weight", out_dim, h))
            if m.bias:
                subs.append(col(a + n + ".bias", out_dim, None))
        subs.append(Param(h * (m.q_dim // tp), False, a + "o.weight", (h, m.q_dim), 1))   # o: row-parallel,
        if m.bias:                                                                     # bias replicated
            subs.append(rep(a + "o.bias", h))
        subs += norm(f"layers.{i}.norm2")
        for n in ("up", "gate")[:2 if m.gated else 1]:      # up, [gate]
            subs.append(col(f + n + ".weight", m.ffn_hidden, h))
            if m.bias:
                subs.append(col(f + n + ".bias", m.ffn_hidden, None))
        subs.append(Param(h * (m.ffn_hidden // tp), False, f + "down.weight", (h, m.ffn_hidden), 1))   # down
        if m.bias:
            subs.append(rep(f + "down.bias", h))
    if last:
        subs += norm("norm")
    return own + subs


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def chunk_units(m, tp: int, sp: bool, zero: int, bucket_MB: float, grad_bytes: int, n_dp: int, layers: range,
                first: bool, last: bool) -> list[Unit]:
    """The flat-buffer units of one chunk, in the order they are reduced (executor/dp.py's grouping and padding)."""
    params = chunk_tensors(m, tp, sp, layers, first, last)
    groups: list[list[Param]] = []
    if zero == 3:
        per_layer = len(chunk_tensors(m, tp, sp, range(1), False, False))
        lead = (1 if first and m.position == "learned" else 0) + (1 if last else 0) + \
            (1 if first and not (last and m.tied_embeddings) else 0)
        layer_part = params[lead:lead + per_layer * len(layers)]
        for i in reversed(range(len(layers))):
            groups.append(layer_part[i * per_layer:(i + 1) * per_layer])
        groups.append(params[:lead] + params[lead + per_layer * len(layers):])
    else:
        order = list(params)
        if last and not (first and m.tied_embeddings):     # the head's own weight: its gradient comes first,
            order.append(order.pop(1 if first and m.position == "learned" else 0))   # so it is reduced first
        cur: list[Param] = []
        cur_bytes = 0
        for q in reversed(order):
            cur.append(q)
            cur_bytes += q.numel * grad_bytes
            if cur_bytes >= bucket_MB * 2**20:
                groups.append(cur)
                cur, cur_bytes = [], 0
        if cur:
            groups.append(cur)
    return [Unit(-(-sum(q.numel for q in g) // n_dp) * n_dp, tuple(g)) for g in groups if g]


# ---- which chunks and units one rank of a stage holds ---------------------------------------------------------
def split_layers(layers: int, chunks: int) -> list[range]:
    """Contiguous layer ranges for each virtual stage. Even when it divides; otherwise the first and last virtual
    stages (which also hold the embedding and the LM head) get fewer layers, as Llama 3 405B does (126 layers on
    16 stages, Dubey et al. 2024 §3.3.2), and the rest spread one extra layer from the middle out."""
    if chunks > layers:
        raise ValueError(f"cannot split {layers} layers over {chunks} virtual stages")
    base, extra = divmod(layers, chunks)
    counts = [base] * chunks
    middle = list(range(1, chunks - 1)) or list(range(chunks))
    middle.sort(key=lambda j: abs(j - (chunks - 1) / 2))
    for j in middle[:extra]:
        counts[j] += 1
    for j in range(extra - len(middle)):             # only when chunks <= 2 and extra > middle
        counts[j] += 1
    out, start = [], 0
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out


def dp_group_size(spec) -> int:
    """The group DataParallel reduces over and ZeRO shards over: dp·cp (pp_stage.Stage's dp+cp group; the
    Trainer's own loop runs only when cp = 1, where it is dp)."""
    return spec.plan.dp * spec.plan.cp


def stage_chunks(spec, stage: int) -> list[tuple[range, bool, bool]]:
    """(layers, first, last) of each model chunk of a pipeline stage, as the plan compiler splits them (chunk c of
    stage s is virtual stage c·pp + s)."""
    p = spec.plan
    v = p.vpp if p.schedule == "interleaved" else 1
    ranges = split_layers(spec.model.layers, p.pp * v)
    return [(ranges[c * p.pp + stage], c * p.pp + stage == 0, c * p.pp + stage == p.pp * v - 1) for c in range(v)]


def rank_chunk_units(spec, layers: range, first: bool, last: bool) -> list[Unit]:
    """The units of one chunk's DataParallel for `spec` (its grad dtype buckets, its DP group's padding)."""
    p, t = spec.plan, spec.training
    return chunk_units(spec.model, p.tp, p.sp, p.zero, p.bucket_MB, 2 if t.grad_dtype == "bf16" else 4,
                       dp_group_size(spec), layers, first, last)


def stage_units(spec, stage: int) -> list[list[Unit]]:
    """The units one rank of `stage` holds, chunk by chunk: what the plan's DP ops carry, the memory model counts,
    verify predicts and a checkpoint stores (executor/reshard.py)."""
    return [rank_chunk_units(spec, *c) for c in stage_chunks(spec, stage)]
