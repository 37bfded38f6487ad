"""Reshard a checkpoint to another parallel layout, in one process (no process group).

A checkpoint (executor/checkpoint.py, `Trainer.state_dict`) holds, per pipeline stage s, TP rank t and DP unit i,
the fp32 master and the optimizer moments of that unit: `pp{s}.tp{t}.u{i}.{param,m,v}` (ZeRO-0: the whole padded
unit, replicated over DP) or `pp{s}.tp{t}.dp{r}.u{i}.{...}` (ZeRO >= 1: shard r of the padded unit over the DP
group, dp·cp when pp or cp > 1). A unit is the concatenation of this rank's TP shards of its parameters in a fixed
order, padded with zeros to a multiple of the DP group (executor/dp.py; spec/units.py `stage_units` reproduces the
grouping, and its `Param`s name each tensor, its full shape and its TP split).

`reshard(src_dir, src_spec, dst_spec, dst_dir)`:
1. reads the source unit by unit (dcp.load of that unit's keys only), undoes the DP sharding and padding, cuts the
   unit into its parameters' TP shards and writes each into the full-size fp32 tensor of master, m, v (the
   vocabulary padding rows dropped; the tied embedding's two copies under pp > 1 are one tensor, "head_weight");
2. cuts every full tensor again by the destination's TP split (vocabulary padded to a multiple of its tp with zero
   rows), concatenates the destination's units, pads them and, for ZeRO >= 1, splits them over its DP group;
3. writes the destination's keys of every rank with one dcp.save without a process group (no_dist): one checkpoint
   from which each rank of the new layout loads its own keys. Each unit tensor is built only when DCP's writer asks
   for it (a planner whose resolve_data cuts it from the full tensors), into a file of its own, so the destination
   never exists in memory as a whole. step, consumed, opt_t and loss_scale carry over.
This is pure data movement: no arithmetic touches a value, so the masters and moments are bit-identical to the
source's (padding elements are zeros in every layout: they never receive a gradient).

Peak host memory: the model's full fp32 state (master + m + v: 12 B/param for Adam(W), 8 B for momentum SGD) plus
one unit (the source's while reading, with its DP shards; the destination's while writing, with one shard copy):
about 12 B/param for AdamW (a 1 B-parameter model: ~12 GB), independent of either layout. Files: one per
destination tensor (ranks x units x states), in the directory DCP's metadata indexes.

Refused with a clear error: another model (any ModelSpec field but `name`), or a change between momentum SGD and
Adam/AdamW (different optimizer state). Allowed: any dp, tp, sp, pp, schedule/vpp, cp, zero, bucket_MB, mesh,
grad_dtype, precision (the masters are fp32 in every precision; fp16's loss scale restarts at its initial value when
the source was not fp16) and global_batch: `consumed` counts sequences and the data is a pure function of the
sequence index (executor/data.py), so the next step reads on from the same sequence whatever the new batch size.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from loom.spec import Spec
from loom.spec.units import Param, Unit, dp_group_size, padded_vocab, stage_units

from . import checkpoint
from .optim import LossScaler

SPEC_FILE = "loom_spec.json"      # the writer's spec, next to DCP's files (Trainer.save)


# ---- the layout a spec writes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    spec: Spec
    n_dp: int                             # the DP group units are padded to and sharded over
    stages: list[list[Unit]]              # per pipeline stage: its units over its chunks, in Trainer's order
    states: tuple[str, ...]               # "param", "m" [, "v"]

    @property
    def tp(self) -> int:
        return self.spec.plan.tp

    @property
    def sharded(self) -> bool:
        return self.spec.plan.zero >= 1

    def where(self, stage: int, tp_rank: int, dp_rank: int) -> str:
        return f"pp{stage}.tp{tp_rank}" + (f".dp{dp_rank}" if self.sharded else "")

    def dp_ranks(self) -> range:
        return range(self.n_dp) if self.sharded else range(1)

    def layout_tensor(self, stage: int) -> torch.Tensor:
        p, units = self.spec.plan, self.stages[stage]
        return torch.tensor([p.dp, p.tp, p.pp, p.cp, p.zero, len(units), units[0].numel])

    def keys(self) -> dict[str, tuple[int, ...]]:
        """Every key the layout's ranks save (Trainer.state_dict) with its shape (scalars: ())."""
        out: dict[str, tuple[int, ...]] = {k: () for k in ("step", "consumed", "loss_scale", "opt_t")}
        for s, units in enumerate(self.stages):
            out[f"pp{s}.layout"] = (7,)
            for t in range(self.tp):
                for r in self.dp_ranks():
                    for i, u in enumerate(units):
                        for x in self.states:
                            out[f"{self.where(s, t, r)}.u{i}.{x}"] = (u.numel // (self.n_dp if self.sharded else 1),)
        return out

    def tag(self) -> str:
        """A directory-name tag: readable, plus a hash of every unit size (bucket_MB, grad_dtype, vpp...)."""
        p = self.spec.plan
        sig = json.dumps([self.n_dp, self.states, [[u.numel for u in us] for us in self.stages],
                          p.dp, p.tp, p.pp, p.cp, p.zero])
        return (f"dp{p.dp}-tp{p.tp}-pp{p.pp}-cp{p.cp}-z{p.zero}-"
                + hashlib.sha1(sig.encode()).hexdigest()[:8])


def layout(spec: Spec) -> Layout:
    """The units each rank of `spec` holds (Trainer: DataParallel over dp; pp_stage.Stage, used when pp or cp > 1:
    one DataParallel per model chunk over the dp·cp group)."""
    stages = [[u for chunk in stage_units(spec, s) for u in chunk] for s in range(spec.plan.pp)]
    states = ("param", "m") if spec.training.optimizer == "sgd" else ("param", "m", "v")
    return Layout(spec, dp_group_size(spec), stages, states)


def same_layout(a: Spec, b: Spec) -> bool:
    """Whether a checkpoint written under `a` loads as it is under `b` (Trainer.load: the same keys and shapes and
    the same layout fingerprints; and a run turning to fp16 needs its initial loss scale, which reshard writes)."""
    la, lb = layout(a), layout(b)
    tensors = lambda lay: [lay.layout_tensor(s).tolist() for s in range(len(lay.stages))]
    to_fp16 = b.training.precision == "fp16" and a.training.precision != "fp16"
    return la.keys() == lb.keys() and tensors(la) == tensors(lb) and not to_fp16


def check_compatible(src: Spec, dst: Spec) -> None:
    """Raise ValueError naming the field when a checkpoint written under `src` cannot resume under `dst`."""
    a, b = src.model.model_dump(exclude={"name"}), dst.model.model_dump(exclude={"name"})
    diff = [f"model.{k} = {b[k]!r} (the checkpoint's: {a[k]!r})" for k in a if a[k] != b[k]]
    if diff:
        raise ValueError(f"the checkpoint was written for another model: {'; '.join(diff)}. A checkpoint resumes "
                         "the model that wrote it ([parallel], precision and batch sizes may change); restore these "
                         "fields or start a fresh run in another run.out_dir")
    if (src.training.optimizer == "sgd") != (dst.training.optimizer == "sgd"):
        raise ValueError(f"training.optimizer = {dst.training.optimizer!r} but the checkpoint holds "
                         f"{src.training.optimizer!r} state (momentum SGD keeps one moment, Adam/AdamW two): "
                         f"set training.optimizer = {src.training.optimizer!r} to resume")


# ---- spec file -------------------------------------------------------------------------------------------------
def write_spec(spec: Spec, path: Path) -> None:
    d = json.loads(spec.model_dump_json())
    d["parallel"] = json.loads(spec.plan.model_dump_json())      # "auto" resolved: the layout that wrote it
    path.mkdir(parents=True, exist_ok=True)
    (path / SPEC_FILE).write_text(json.dumps(d, indent=1))


def read_spec(path: Path) -> Spec | None:
    f = Path(path) / SPEC_FILE
    return Spec.model_validate_json(f.read_text()) if f.exists() else None


# ---- TP cutting ------------------------------------------------------------------------------------------------
def _span(q: Param, tp: int, t: int) -> tuple[int, int, int]:
    """(dim, lo, hi) of TP rank t's shard along q.split, in the (vocabulary-padded) full tensor."""
    n = padded_vocab(q.shape[0], tp) if q.vocab_padded else q.shape[q.split]
    per = n // tp
    return q.split, t * per, (t + 1) * per


def _local_shape(q: Param, tp: int) -> tuple[int, ...]:
    if q.split is None:
        return q.shape
    dim, lo, hi = _span(q, tp, 0)
    return tuple(hi - lo if d == dim else n for d, n in enumerate(q.shape))


def _full_name(q: Param, spec: Spec) -> str:
    # tied embeddings under pp > 1: the first stage's embed.weight is a copy of the last stage's head_weight
    # (pp_stage.py sums their gradients), one tensor in the single process (Trainer.full_state)
    return "head_weight" if q.name == "embed.weight" and spec.model.tied_embeddings else q.name


# ---- read: source units -> full tensors ------------------------------------------------------------------------
def read_full(src_dir: Path, src: Layout) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The full fp32 master and moments of every parameter ({name: {"param"|"m"|"v": tensor}}) and the scalars
    (step, consumed, loss_scale, opt_t), read unit by unit from a checkpoint written under `src`."""
    src_dir = Path(src_dir)
    scalars = {"step": torch.tensor(0), "consumed": torch.tensor(0), "opt_t": torch.tensor(0),
               "loss_scale": torch.tensor(1.0, dtype=torch.float64)}
    scalars.update({f"pp{s}.layout": torch.zeros(7, dtype=torch.int64) for s in range(len(src.stages))})
    checkpoint.load(scalars, src_dir, no_dist=True)
    for s in range(len(src.stages)):
        got, want = scalars.pop(f"pp{s}.layout"), src.layout_tensor(s)
        if not torch.equal(got, want):
            raise ValueError(f"{src_dir} stage {s} was written by layout {got.tolist()} (dp, tp, pp, cp, zero, units, "
                             f"first unit) but its {SPEC_FILE} describes {want.tolist()}: the spec file does not "
                             "belong to this checkpoint")
    full: dict[str, dict[str, torch.Tensor]] = {}
    for s, units in enumerate(src.stages):
        for t in range(src.tp):
            for i, u in enumerate(units):
                per = u.numel // (src.n_dp if src.sharded else 1)
                sd = {f"{src.where(s, t, r)}.u{i}.{x}": torch.empty(per) for r in src.dp_ranks() for x in src.states}
                checkpoint.load(sd, src_dir, no_dist=True)
                for x in src.states:
                    flat = torch.cat([sd[f"{src.where(s, t, r)}.u{i}.{x}"] for r in src.dp_ranks()])
                    off = 0
                    for q in u.params:
                        _place(full, q, src, t, x, flat[off:off + q.numel])
                        off += q.numel
                del sd
    return full, scalars


def _place(full: dict, q: Param, lay: Layout, t: int, x: str, shard: torch.Tensor) -> None:
    name = _full_name(q, lay.spec)
    if q.split is None and t > 0:
        return                                       # replicated over TP: every rank holds the same values
    dst = full.setdefault(name, {}).get(x)
    if dst is None:
        dst = full[name][x] = torch.zeros(q.shape)
    shard = shard.view(_local_shape(q, lay.tp))
    if q.split is None:
        dst.copy_(shard)
        return
    dim, lo, hi = _span(q, lay.tp, t)
    hi_real = min(hi, q.shape[dim])                  # the vocabulary padding rows are dropped
    if hi_real > lo:
        dst.narrow(dim, lo, hi_real - lo).copy_(shard.narrow(dim, 0, hi_real - lo))


# ---- write: full tensors -> destination units --------------------------------------------------------------------
def _shard_of(full: torch.Tensor, q: Param, tp: int, t: int) -> torch.Tensor:
    if q.split is None:
        return full
    dim, lo, hi = _span(q, tp, t)
    if q.vocab_padded and hi > q.shape[0]:           # zero rows up to a multiple of tp (model.py's padding)
        pad = torch.zeros((padded_vocab(q.shape[0], tp) - q.shape[0], *q.shape[1:]))
        full = torch.cat([full, pad])
    return full.narrow(dim, lo, hi - lo)


class _Units:
    """The destination's unit keys, each built from the full tensors only when DCP's writer asks for it: the padded
    unit of (stage, TP rank, unit, state) is cut once and its DP shards handed out (the last one is cached)."""

    def __init__(self, full: dict[str, dict[str, torch.Tensor]], dst: Layout):
        self.full, self.dst = full, dst
        self.where: dict[str, tuple[int, int, int, str, int]] = {}     # key -> (stage, tp, unit, state, dp shard)
        for s, units in enumerate(dst.stages):
            for t in range(dst.tp):
                for r in dst.dp_ranks():
                    for i in range(len(units)):
                        for x in dst.states:
                            self.where[f"{dst.where(s, t, r)}.u{i}.{x}"] = (s, t, i, x, r)
        self._last: tuple | None = None
        self._flat = torch.empty(0)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        keys = self.dst.keys()
        return {k: keys[k] for k in self.where}

    def unit(self, s: int, t: int, i: int, x: str) -> torch.Tensor:
        if self._last != (s, t, i, x):
            u = self.dst.stages[s][i]
            flat = torch.zeros(u.numel)                  # the padding stays zero
            off = 0
            for q in u.params:
                src = self.full[_full_name(q, self.dst.spec)][x]
                flat[off:off + q.numel].copy_(_shard_of(src, q, self.dst.tp, t).reshape(-1))
                off += q.numel
            self._last, self._flat = (s, t, i, x), flat
        return self._flat

    def build(self, key: str) -> torch.Tensor:
        s, t, i, x, r = self.where[key]
        flat = self.unit(s, t, i, x)
        return flat.chunk(self.dst.n_dp)[r].clone() if self.dst.sharded else flat


class _LazyPlanner(DefaultSavePlanner):
    """DCP's default planner, except that the unit tensors are built when written (`resolve_data`, the planner's
    hook for producing an item's data): the plan is made from stride-0 placeholders of the right shape."""

    def __init__(self, units: _Units):
        super().__init__()
        self.units = units

    def resolve_data(self, write_item):
        key = write_item.index.fqn
        if key in self.units.where:
            return self.units.build(key)
        return super().resolve_data(write_item)


def reshard(src_dir: str | Path, src_spec: Spec, dst_spec: Spec, dst_dir: str | Path) -> Path:
    """Write the checkpoint at `src_dir` (written under `src_spec`) again for `dst_spec`'s layout at `dst_dir`
    (with the spec file, so it resumes like any checkpoint). One process, no process group. Returns dst_dir."""
    check_compatible(src_spec, dst_spec)
    src, dst = layout(src_spec), layout(dst_spec)
    full, scalars = read_full(Path(src_dir), src)
    if dst_spec.training.precision == "fp16" and src_spec.training.precision != "fp16":
        scalars["loss_scale"] = torch.tensor(LossScaler().scale, dtype=torch.float64)   # fp16's initial scale
    units = _Units(full, dst)
    state: dict[str, torch.Tensor] = {k: torch.zeros(1).expand(shape) for k, shape in units.shapes().items()}
    state.update({f"pp{s}.layout": dst.layout_tensor(s) for s in range(len(dst.stages))})
    state.update(scalars)
    dst_dir = Path(dst_dir)
    write_spec(dst_spec, dst_dir)
    # one file per tensor: DCP's writer holds every tensor of a file until the file is closed (filesystem.py
    # _write_files_from_queue), so this keeps one destination tensor alive at a time
    writer = FileSystemWriter(str(dst_dir), single_file_per_rank=False)
    dcp.save(state, storage_writer=writer, planner=_LazyPlanner(units), no_dist=True)
    return dst_dir
