"""One rank's training state and step (`Trainer`); the entry point that runs it is `loom.executor.train`.

Each rank builds its part of the model from the spec, compiles the plan (`loom.spec.compile_plan`) and runs its
stage's program (`plan.program(stage)`) op by op every step:
  forward(mb) / backward(mb)  -> run that micro-batch (TP/SP collectives and recompute happen inside them; the
                                 plan lists them as ops after the compute op: the comm log is checked against
                                 them instead of issuing them twice, tests/test_plan_executor_agreement.py)
  dp_allreduce / dp_reducescatter -> wait for the gradient buckets (issued asynchronously by backward hooks)
  optimizer                   -> global-norm clipping and the AdamW step over this rank's shards
  zero_allgather              -> ZeRO-1/2: gather the updated parameters (ZeRO-3: issued by the layer hooks)
Parallelisms are applied in the architecture's order: pipeline split (pp_stage.py) -> TP/SP (model.py, tp.py)
-> CP (context_parallel.py) -> recompute (model.py) -> DP/ZeRO (dp.py). With pp > 1 or cp > 1 the program runs
through `pp_stage.Stage` (the pipeline runner: F/B/SEND/RECV in the plan's order), otherwise in `Trainer.step`'s
own loop. `Trainer.step(on_op=...)` reports every op of the program with its start and end time.
"""
from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from loom.spec import Spec
from loom.spec.compile import compile_plan

from . import checkpoint, comm
from .data import Batches, TokenData
from .dp import DataParallel
from .mesh import Mesh
from .model import BuildCtx, Decoder
from .optim import FlatAdamW, LossScaler, clip_, global_grad_norm, lr_at, wsd_decay_start
from .reshard import write_spec

OpHook = Callable[[Any, float, float], None]      # (plan op, start_s, end_s), time.perf_counter() clock
ADAM_BETAS = (0.9, 0.95)        # GPT-3 (Brown et al. 2020, App. B) and Llama (Touvron et al. 2023 §2.2)


@dataclass
class StepStats:
    step: int                   # 1-based: optimizer steps done
    loss: float                 # mean cross-entropy over every token of the global batch (nats)
    grad_norm: float
    lr: float
    time_s: float
    tokens_per_s: float
    mfu: float                  # model_flops_per_token (PaLM convention) / (time · ranks · peak)
    mem_bytes: int              # peak device memory (CUDA) or peak RSS (CPU)
    skipped: bool = False       # fp16 overflow


def total_steps(spec: Spec, steps: int | None = None) -> int:
    if steps:
        return steps
    if spec.run.steps:
        return spec.run.steps
    if spec.training.tokens:
        return max(1, int(spec.training.tokens // spec.tokens_per_step))
    raise ValueError("the number of steps is unknown: set run.steps or training.tokens in the spec, or --steps")


class Trainer:
    """One rank's training state and step. `steps` is the schedule length (for the LR and data stages)."""

    def __init__(self, spec: Spec, mesh: Mesh, device: torch.device, steps: int, profile: bool = False):
        p, t, m = spec.plan, spec.training, spec.model
        self.spec, self.mesh, self.device, self.steps = spec, mesh, device, steps
        self.cuda = device.type == "cuda"
        # bf16/fp16: autocast on CUDA and on CPU alike (the same code path, so CPU tests exercise it). fp8: the
        # executor has no fp8 GEMMs, so it runs bf16 autocast, which is also what the plan counts for fp8's
        # activations and parameters (spec/compile.py: fp8 keeps activations bf16)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}.get(t.precision)
        # ZeRO-3: the model's parameters stay on the host until DataParallel sends each rank its shard
        self.ctx = BuildCtx(m, mesh.tp, p.sp, t.recompute, t.seed, device, params_on_host=p.zero == 3)
        self.plan = compile_plan(spec)
        grad_dtype = torch.bfloat16 if t.grad_dtype == "bf16" else torch.float32
        self.stage = None
        if p.pp > 1 or p.cp > 1:                          # part 2: pipeline / context parallel stage
            from loom.spec.mesh import Mesh as SpecMesh

            from .pp_stage import Stage, make_extra_groups
            groups = {"pp": mesh["pp"], "tp": mesh.tp, "cp": mesh["cp"],
                      **make_extra_groups(SpecMesh.from_spec(spec))}
            self.stage = Stage(spec, self.plan, groups, device=device, grad_dtype=grad_dtype,
                               act_dtype=self.amp_dtype or torch.float32,       # bf16 stage boundaries
                               param_dtype=self.amp_dtype or torch.float32)     # bf16 params, fp32 masters
            self.model, self.dp = self.stage.modules(), self.stage
        else:
            self.model = Decoder(self.ctx)
            self.dp = DataParallel(self.model, mesh.dp, mesh.tp, p.zero, p.bucket_MB, grad_dtype,
                                   layer_units=list(self.model.layers),
                                   param_dtype=self.amp_dtype or torch.float32)
        decay, self.count = self.dp.masks()
        self.opt = FlatAdamW(self.dp.param_shards(), decay, t.optimizer, ADAM_BETAS, weight_decay=t.weight_decay)
        self.scaler = LossScaler() if self.amp_dtype == torch.float16 else None
        self.program = self.plan.program(mesh["pp"].rank)
        self.n_micro = spec.micro_batches
        self.global_tokens = t.global_batch * m.seq_len   # every position has a target (packed, no padding)
        self.data = Batches(TokenData(spec.data, m.seq_len, t.seed, m.vocab), t.global_batch, t.micro_batch,
                            mesh.dp.size, mesh.dp.rank, device)
        self.decay_start = wsd_decay_start(steps, t.warmup_steps, t.decay_fraction) \
            if t.lr_schedule == "wsd" else steps
        self.step_no, self.consumed = 0, 0
        gpu = spec.gpu
        prec = t.precision if self.cuda else "fp32"
        self.peak_flops = gpu.peak_flops.get(prec) or max(gpu.peak_flops.values())
        self.flops_per_step = m.model_flops_per_token() * spec.tokens_per_step
        self.ranks = p.size
        # profile: time every plan op (synchronising CUDA after each, which removes overlap): (op id, kind,
        # micro-batch, seconds) of the last step, for verify to hold against the simulator's op durations.
        self.profile = profile
        self.op_times: list[tuple[int, str, int, float]] = []
        self.last_trace: list[str] = []                    # pp/cp: the runner's executed actions of the last step

    # ---- one step ----------------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step(self, on_op: OpHook | None = None) -> StepStats:
        """One optimizer step. `on_op(op, start_s, end_s)` (time.perf_counter() clock) is called once for every op
        of `self.program` when it is done: this rank's view of the plan op by op (verify times ops with it)."""
        t0 = time.perf_counter()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        batches = self.data.micro_batches(self.consumed, decay=self.step_no >= self.decay_start)
        self.op_times.clear()
        if self.stage is not None:
            loss_sum, stats = self._stage_step(batches, on_op)
        else:
            loss_sum, stats = self._plain_step(batches, on_op)
        self.step_no += 1
        self.consumed += self.spec.training.global_batch
        if self.cuda:
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        mem = torch.cuda.max_memory_allocated(self.device) if self.cuda else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return StepStats(self.step_no, float(loss_sum), stats.get("norm", 0.0), stats.get("lr", 0.0), dt,
                         self.spec.tokens_per_step / dt, self.flops_per_step / (dt * self.ranks * self.peak_flops),
                         int(mem), stats.get("skipped", False))

    def _done(self, op, t_op: float, on_op: OpHook | None) -> None:
        if self.profile and self.cuda:
            torch.cuda.synchronize(self.device)
        end = time.perf_counter()
        if self.profile:
            self.op_times.append((op.id, op.kind.value, op.microbatch, end - t_op))
        if on_op is not None:
            on_op(op, t_op, end)

    def _plain_step(self, batches, on_op: OpHook | None) -> tuple[torch.Tensor, dict]:
        """pp = cp = 1: the program in this loop."""
        losses: dict[int, torch.Tensor] = {}
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        unfinished = optimized = gathered = False        # unfinished: a backward whose DP reduction is not waited
        stats: dict = {}
        for op in self.program:
            kind = op.kind.value
            comm.LOG.tag = kind
            t_op = time.perf_counter()
            if kind == "forward":
                ids, tgt = batches[op.microbatch]
                if self.dp.zero == 3:
                    self.dp.gather_root()
                with self._autocast():
                    x = self.model(ids)
                    total = self.model.loss_sum(x, tgt)
                loss = total / self.global_tokens          # mean over the *global* batch: DP reduces by sum
                loss_sum += loss.detach()
                losses[op.microbatch] = loss * self.scaler.scale if self.scaler else loss
            elif kind == "backward":
                if unfinished:
                    self.dp.finish_backward()
                self.dp.start_micro_batch(op.microbatch, self.n_micro)
                losses.pop(op.microbatch).backward()
                unfinished = True
            elif kind in ("dp_allreduce", "dp_reducescatter"):
                if unfinished:                               # the buckets were issued by the backward's hooks
                    self.dp.finish_backward()
                    unfinished = False
            elif kind == "optimizer":
                if unfinished:
                    self.dp.finish_backward()
                    unfinished = False
                stats = self._optimize()
                optimized = True
            elif kind == "zero_allgather":
                if optimized and not gathered:
                    self.dp.gather_params()
                    gathered = True
            # tp_allreduce, sp_allgather, sp_reducescatter, recompute: done inside forward/backward
            self._done(op, t_op, on_op)
        if self.dp.zero in (1, 2) and not gathered:
            self.dp.gather_params()
        comm.LOG.tag = "loss_report"
        comm.all_reduce(loss_sum, self.mesh.dp)
        return loss_sum, stats

    def _stage_step(self, batches, on_op: OpHook | None) -> tuple[torch.Tensor, dict]:
        """pp > 1 or cp > 1: the plan's program through executor.pp_stage.Stage (the pipeline runner)."""
        stats: dict = {}
        scale = self.scaler.scale if self.scaler else 1.0

        def hook(op, start: float, end: float) -> None:
            if self.profile:
                self.op_times.append((op.id, op.kind.value, op.microbatch, end - start))
            if on_op is not None:
                on_op(op, start, end)

        res = self.stage.step(self.program, batch=lambda mb: batches[mb],
                              optimize=lambda: stats.update(self._optimize()), gather=self.stage.gather_params,
                              forward_ctx=self._autocast, loss_multiplier=scale,
                              on_op=hook if (on_op is not None or self.profile) else None)
        self.last_trace = res.trace                         # the pipeline actions as executed, in order
        loss_sum = torch.tensor((res.loss or 0.0) / scale, dtype=torch.float32, device=self.device)
        comm.LOG.tag = "loss_report"
        comm.all_reduce(loss_sum, self.stage.dpcp)              # the last stage's share of the tokens
        comm.all_reduce(loss_sum, self.mesh["pp"])              # other stages hold 0
        return loss_sum, stats

    def _optimize(self) -> dict:
        grads = self.dp.grad_shards()
        groups = self.dp.norm_groups()
        lr = lr_at(self.step_no, self.steps, self.spec.training.lr, self.spec.training.min_lr,
                   self.spec.training.lr_schedule, self.spec.training.warmup_steps, self.spec.training.decay_fraction)
        if self.scaler is not None:
            for g in grads:
                g.div_(self.scaler.scale)
            inf = self.scaler.found_inf(grads, [self.mesh.tp, self.mesh.dp, self.mesh["pp"], self.mesh["cp"]])
            self.scaler.update(inf)
            if inf:
                self.dp.zero_grad()
                return {"norm": float("inf"), "lr": lr, "skipped": True}
        norm = global_grad_norm(grads, self.count, groups)
        clip_(grads, norm, self.spec.training.grad_clip)
        self.opt.step(grads, lr)
        self.dp.refresh_params()                           # bf16/fp16: the masters rounded into the parameters
        self.dp.zero_grad()
        return {"norm": float(norm), "lr": lr}

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every parameter at full size (TP shards gathered, ZeRO-3 units gathered, vocab padding cut), as the
        single-process model names them (layers by their global index), on every rank: for parity tests and
        export. With pp > 1 each stage contributes its own names (gathered over the pp group). Collective.
        In fp32 (widened exactly) under bf16/fp16: the rounded values the model computes with (dp.py); the fp32
        masters are the optimizer's shards (`state_dict`, checkpoints)."""
        dps = self.stage.dps if self.stage is not None else [self.dp]
        decoders = self.stage.decoders if self.stage is not None else [self.model]
        for dp in dps:
            if dp.zero == 3:
                for u in dp.units:
                    dp._gather(u)
        out: dict[str, torch.Tensor] = {}
        tp = self.mesh.tp
        tied_copy = self.spec.model.tied_embeddings
        for d in decoders:
            for name, prm in d.named_parameters():
                if name == "embed.weight" and tied_copy and not d.last:
                    continue         # tied: the single process names the one weight head_weight (the last stage's copy)
                parts = name.split(".")
                if parts[0] == "layers":                     # local index in the chunk -> global layer index
                    parts[1] = str(d.layers[int(parts[1])].index)
                t = prm.detach().to(torch.float32, copy=True)    # bf16 parameters widened (exact)
                if getattr(prm, "loom_tp_split", False) and tp.active:
                    dim = prm.loom_tp_dim
                    shard = t.movedim(dim, 0).contiguous()
                    full = shard.new_empty((shard.shape[0] * tp.size, *shard.shape[1:]))
                    comm.all_gather(full, shard, tp)
                    t = full.movedim(0, dim)
                if name in ("embed.weight", "head_weight"):
                    t = t[: self.spec.model.vocab]
                out[".".join(parts)] = t.contiguous()
        for dp in dps:
            if dp.zero == 3:
                for u in dp.units:
                    dp._release(u)
        pp = self.mesh["pp"]
        if pp.active:
            parts_of = [None] * pp.size
            dist.all_gather_object(parts_of, out, group=pp.pg)
            out = {k: v for part in parts_of for k, v in part.items()}
        return out

    # ---- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """DCP keys name what this rank holds: its stage (pp), TP rank and, for ZeRO >= 1, its shard of the
        DP (×CP) group; replicated tensors carry the same key on every replica (DCP writes them once)."""
        p = self.spec.plan
        stage = self.mesh["pp"].rank
        dp_rank = self.stage.dpcp.rank if self.stage is not None else self.mesh.dp.rank
        units = self.dp.units
        sd: dict[str, torch.Tensor] = {
            f"pp{stage}.layout": torch.tensor([p.dp, p.tp, p.pp, p.cp, p.zero, len(units), units[0].numel]),
            "step": torch.tensor(self.step_no), "consumed": torch.tensor(self.consumed),
            "loss_scale": torch.tensor(self.scaler.scale if self.scaler else 1.0, dtype=torch.float64),
            "opt_t": torch.tensor(self.opt.t)}
        where = f"pp{stage}.tp{self.mesh.tp.rank}" + ("" if p.zero == 0 else f".dp{dp_rank}")
        for i, prm in enumerate(self.opt.params):
            sd[f"{where}.u{i}.param"] = prm
            sd[f"{where}.u{i}.m"] = self.opt.m[i]
            if self.opt.v:
                sd[f"{where}.u{i}.v"] = self.opt.v[i]
        return sd

    def save(self, out_dir: str | Path) -> Path:
        """Every rank saves its keys; rank 0 first records the spec (loom_spec.json: what executor/reshard.py needs
        to resume under another layout) - before DCP's .metadata, which marks the checkpoint complete."""
        path = checkpoint.step_dir(out_dir, self.step_no)
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_spec(self.spec, path)
        checkpoint.save(self.state_dict(), path)
        return path

    def load(self, path: str | Path) -> None:
        sd = self.state_dict()
        key = f"pp{self.mesh['pp'].rank}.layout"
        expect = sd[key].clone()
        try:
            checkpoint.load(sd, Path(path))
        except Exception as exc:                           # DCP names the missing keys: another layout wrote it
            raise ValueError(f"checkpoint {path} does not hold this layout's state ({str(exc)[:200]}): resume "
                             "with the same [parallel], or reshard it (loom run does when the checkpoint has its "
                             "loom_spec.json; executor/reshard.py)") from exc
        if not torch.equal(sd[key], expect):
            raise ValueError(f"checkpoint {path} was written by another layout ({sd[key].tolist()} vs "
                             f"{expect.tolist()} as dp, tp, pp, cp, zero, units): resume with the same [parallel], "
                             "or reshard it (executor/reshard.py)")
        self.step_no, self.consumed = int(sd["step"]), int(sd["consumed"])
        self.opt.t = int(sd["opt_t"])
        if self.scaler:
            self.scaler.scale = float(sd["loss_scale"])
        self.dp.refresh_params()                           # the loaded masters into the parameters (bf16/fp16)
        self.dp.gather_params()                            # ZeRO-1/2: make the full parameters consistent
