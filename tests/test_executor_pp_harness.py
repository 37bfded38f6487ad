"""Shared harness for the pipeline / context-parallel tests (no tests of its own besides the pool's self-check).

- `RankPool(world)`: gloo ranks started once per test module; `pool.run(fn, *args)` runs a module-level function on
  every rank and returns the per-rank results (an exception on any rank fails the call with its traceback).
  Each layout builds its own process groups inside the job, so one pool serves many layouts.
- `train_parallel(cfg)`: a few optimizer steps of part 1's Decoder under a layout (pp, vpp, schedule, dp, cp,
  tp, sp, zero) on the ranks of the pool, driven by the compiled plan's per-stage program.
- `train_reference(cfg)`: the same steps in one process (no parallelism): the parity oracle.
Model: 4 layers, hidden 32, 4 heads / 2 kv heads (GQA), ffn 64, vocab 64, seq 16, tied embeddings, fp32.
"""
from __future__ import annotations

import atexit
import datetime
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

TIMEOUT_S = 120.0


# ---- the pool ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, inq, outq) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    while True:
        job = inq.get()
        if job is None:
            break
        fn, args = job
        try:
            outq.put((rank, True, fn(*args)))
        except BaseException:                       # noqa: BLE001 - report everything to the test
            outq.put((rank, False, traceback.format_exc()))


class RankPool:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        port = _free_port()
        self.inqs = [ctx.Queue() for _ in range(world)]
        self.outq = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, self.inqs[r], self.outq), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, timeout_s: float = 300.0) -> list:
        for q in self.inqs:
            q.put((fn, args))
        out: list = [None] * self.world
        errors = []
        for _ in range(self.world):
            try:
                rank, ok, res = self.outq.get(timeout=timeout_s)
            except queue.Empty:
                raise RuntimeError(f"pool job {fn.__name__} did not finish in {timeout_s} s") from None
            if ok:
                out[rank] = res
            else:
                errors.append(f"rank {rank}:\n{res}")
        if errors:
            raise RuntimeError("\n".join(errors))
        return out

    def close(self) -> None:
        for q in self.inqs:
            q.put(None)
        deadline = time.monotonic() + 3.0
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:                        # a rank stuck in a broken group: stop it (our own child)
            if p.is_alive():
                p.kill()
                p.join()


# ---- groups --------------------------------------------------------------------------------------------------
ORDER = ("pp", "dp", "cp", "tp")


def make_groups(sizes: dict[str, int]) -> dict | None:
    """Process groups of the layout `sizes` laid out on global ranks [0, size) in ORDER (row-major, tp innermost,
    as loom.spec.mesh.Mesh). Every rank of the pool must call this (new_group is collective); ranks outside the
    layout get None. Extra groups from executor.pp_stage.make_extra_groups: "dp+cp" and "emb"."""
    from loom.executor.comm import Group
    from loom.spec.mesh import Mesh

    mesh = Mesh(ORDER, tuple(sizes.get(d, 1) for d in ORDER))
    n, me = mesh.world_size, dist.get_rank()
    mine: dict = {}

    def add(name: str, groups: list[list[int]]) -> None:
        for ranks in groups:
            pg = dist.new_group(ranks) if len(ranks) > 1 else None
            if me in ranks:
                mine[name] = Group(name, pg, len(ranks), ranks.index(me))

    for d in ORDER:
        add(d, mesh.groups(d))
    from loom.executor.pp_stage import make_extra_groups
    mine.update(make_extra_groups(mesh))
    if me >= n:
        return None
    mine["coords"] = mesh.coords(me)
    return mine


# ---- the run -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cfg:
    pp: int = 1
    vpp: int = 1
    schedule: str = "1f1b"
    dp: int = 1
    cp: int = 1
    tp: int = 1
    sp: bool = False
    zero: int = 0
    cp_layout: str = "zigzag"
    global_batch: int = 8
    micro_batch: int = 1
    steps: int = 2
    lr: float = 0.5
    optimizer: str = "sgd"
    grad_clip: float = 0.0
    recompute: str = "none"
    precision: str = "fp32"          # "bf16": stage boundaries carry bf16 (the plan then counts 2-byte activations)
    model: dict = field(default_factory=lambda: dict(layers=4, hidden=32, heads=4, kv_heads=2, ffn_hidden=64,
                                                       vocab=64, seq_len=16, tied_embeddings=True))

    @property
    def size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp


def make_spec(cfg: Cfg):
    from loom.spec.model import ModelSpec
    from loom.spec.spec import ClusterSpec, ParallelSpec, Spec, TrainingSpec
    return Spec(model=ModelSpec(**cfg.model), cluster=ClusterSpec(gpu="cpu", gpus_per_node=cfg.size, nodes=1),
                training=TrainingSpec(global_batch=cfg.global_batch, micro_batch=cfg.micro_batch,
                                      precision=cfg.precision, recompute=cfg.recompute, lr=cfg.lr, grad_clip=cfg.grad_clip),
                parallel=ParallelSpec(pp=cfg.pp, dp=cfg.dp, cp=cfg.cp, tp=cfg.tp, sp=cfg.sp, zero=cfg.zero,
                                      schedule=cfg.schedule, vpp=cfg.vpp))


def tokens(cfg: Cfg) -> torch.Tensor:
    """(steps, global_batch, seq + 1) token ids, the same for every layout."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(cfg.model["vocab"], (cfg.steps, cfg.global_batch, cfg.model["seq_len"] + 1), generator=g)


def named_params(decoders: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Parameters under global names (layer index = the Block's global index)."""
    out = {}
    for d in decoders:
        for name, p in d.named_parameters():
            if name.startswith("layers."):
                local, rest = name.split(".", 2)[1:]
                name = f"layers.{d.layers[int(local)].index}.{rest}"
            out[name] = p.detach().clone()
    return out


def _optimizer(dpw, cfg: Cfg):
    from loom.executor.optim import FlatAdamW
    decay, _ = dpw.masks()
    # Momentum SGD: its update is linear in the gradient, so final parameters expose gradient errors directly
    # (Adam divides by sqrt(v) and amplifies fp32 rounding of tiny gradients into lr-sized differences).
    return FlatAdamW(dpw.param_shards(), decay, cfg.optimizer, weight_decay=0.1)


def _optimize(dpw, opt, cfg: Cfg, count, groups) -> float:
    """Part 1's clipping and optimizer step over the wrapper's shards; returns the global gradient norm."""
    from loom.executor.optim import clip_, global_grad_norm
    grads = dpw.grad_shards()
    norm = global_grad_norm(grads, count, groups)
    clip_(grads, norm, cfg.grad_clip)
    opt.step(grads, cfg.lr)
    dpw.zero_grad()
    return float(norm)


def train_reference(cfg: Cfg) -> dict:
    """Single process: the whole model, the whole global batch, the same optimizer arithmetic."""
    from loom.executor.comm import SINGLE
    from loom.executor.dp import DataParallel
    from loom.executor.model import BuildCtx, Decoder
    spec = make_spec(cfg)
    dec = Decoder(BuildCtx(spec.model, seed=0))
    dpw = DataParallel(dec, SINGLE, SINGLE, 0, 25.0)
    opt = _optimizer(dpw, cfg)
    data, scale, losses, norms = tokens(cfg), 1.0 / (cfg.global_batch * cfg.model["seq_len"]), [], []
    for step in range(cfg.steps):
        dpw.start_micro_batch(0, 1)
        x = data[step]
        loss = dec.token_losses(dec(x[:, :-1]), x[:, 1:]).sum() * scale
        loss.backward()
        dpw.finish_backward()
        norms.append(_optimize(dpw, opt, cfg, dpw.masks()[1], dpw.norm_groups()))
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "params": named_params([dec])}


def train_parallel(cfg: Cfg) -> dict | None:
    """One rank of `cfg`'s layout (executor.pp_stage.Stage driven by the compiled plan's program); returns the
    losses (summed over the last stage's dp×cp replicas), gradient norms, parameters, executed pipeline trace."""
    from loom.executor.pipeline import stage_program
    from loom.executor.pp_stage import Stage
    from loom.spec.compile import compile_plan
    groups = make_groups({"pp": cfg.pp, "dp": cfg.dp, "cp": cfg.cp, "tp": cfg.tp})
    if groups is None:
        return None
    spec = make_spec(cfg)
    plan = compile_plan(spec)
    c = groups["coords"]
    wire = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    stage = Stage(spec, plan, groups, cp_layout=cfg.cp_layout, act_dtype=wire)
    opt = _optimizer(stage, cfg)
    count = stage.masks()[1]
    data = tokens(cfg)
    per_replica = cfg.global_batch // cfg.dp
    program = stage_program(plan, c["pp"])
    from loom.executor import comm
    losses, norms, traces, others = [], [], [], []
    sent: dict[str, int] = {}
    for step in range(cfg.steps):
        comm.LOG.clear()
        def batch(mb: int, step=step):
            lo = c["dp"] * per_replica + mb * cfg.micro_batch
            x = data[step, lo:lo + cfg.micro_batch]
            return x[:, :-1], x[:, 1:]

        def optimize():
            norms.append(_optimize(stage, opt, cfg, count, stage.norm_groups()))
        res = stage.step(program, batch, optimize, stage.gather_params)
        others.append([op.kind.value for op in program if op.kind.value in ("dp_allreduce", "dp_reducescatter",
                                                                          "optimizer", "zero_allgather")])
        losses.append(res.loss)
        traces.append(res.trace)
        if step == 0:
            times = [(a, res.t0_s + t0, res.t0_s + t1) for a, t0, t1 in res.times]
            for rec in comm.LOG.records:
                if rec.kind == "send":
                    sent[rec.group] = sent.get(rec.group, 0) + rec.bytes
    planned: dict[str, float] = {}
    for op in program:
        if op.kind.value in ("pp_send_act", "pp_send_grad", "cp_kv_exchange"):
            planned[op.group] = planned.get(op.group, 0.0) + op.msg_bytes * op.count
    if cfg.zero == 3:                                # ZeRO-3 keeps only shards between steps: gather to read
        for dp in stage.dps:
            for u in dp.units:
                dp._gather(u)
    total = torch.tensor([l if l is not None else 0.0 for l in losses], dtype=torch.float64)
    if groups["dp+cp"].active:
        dist.all_reduce(total, group=groups["dp+cp"].pg)
    return {"coords": c, "losses": total.tolist() if res.loss is not None else None, "norms": norms,
            "params": named_params(stage.decoders), "trace": traces[0], "sent": sent, "planned": planned,
            "times": times,
            "plan": [str(a) for a in _pp_actions(program)]}


def _pp_actions(program) -> list:
    from loom.executor.pipeline import to_action
    return [a for a in map(to_action, program) if a is not None]


def compare(cfg: Cfg, results: list, ref: dict, atol: float = 2e-5) -> dict:
    """Max abs differences of losses and final parameters (TP shards against the matching slice)."""
    worst_loss, worst_param, worst_norm, seen = 0.0, 0.0, 0.0, set()
    for r in results:
        if r is None:
            continue
        assert len(r["norms"]) == cfg.steps                 # the optimizer ran once per step, on every rank
        worst_norm = max([worst_norm] + [abs(a - b) / b for a, b in zip(r["norms"], ref["norms"])])
        if r["losses"] is not None:
            for a, b in zip(r["losses"], ref["losses"]):
                worst_loss = max(worst_loss, abs(a - b))
        for name, p in r["params"].items():
            if name not in ref["params"]:                # tied: the single process holds one of the two names
                name = {"head_weight": "embed.weight", "embed.weight": "head_weight"}[name]
            full = ref["params"][name]
            if p.shape != full.shape:
                dim = next(i for i, (a, b) in enumerate(zip(p.shape, full.shape)) if a != b)
                full = full.narrow(dim, r["coords"]["tp"] * p.shape[dim], p.shape[dim])
            worst_param = max(worst_param, (p - full).abs().max().item())
            seen.add(name)
    missing = set(ref["params"]) - seen
    assert not missing, f"parameters never compared: {sorted(missing)}"
    return {"loss": worst_loss, "param": worst_param, "norm_rel": worst_norm}


_POOL: RankPool | None = None
POOL_WORLD = 8


def shared_pool() -> RankPool:
    """One pool of 8 gloo ranks for every PP/CP test module of the session (starting ranks costs seconds on two
    cores); layouts smaller than 8 leave the other ranks idle. Closed at interpreter exit."""
    global _POOL
    if _POOL is None:
        _POOL = RankPool(POOL_WORLD)
        atexit.register(_POOL.close)
    return _POOL


def test_pool_runs_jobs_on_every_rank():
    assert shared_pool().run(dist.get_rank) == list(range(POOL_WORLD))
