"""The spec a user writes: model, cluster, training and parallelism, as pydantic models.

Field names are a contract (other tools generate spec files). Per-field checks live on the models; the checks
that relate fields across tables live in `validate.py`, which names each field and its fix.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from .gpus import GPU, GiB, lookup
from .model import ModelSpec
from .run import DataSpec, RunSpec

Precision = Literal["bf16", "fp16", "fp8", "fp32"]
MESH_DIMS = ("pp", "dp", "cp", "tp")


class CustomGPU(BaseModel):
    """A GPU that is not in the catalog, described by its datasheet figures."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "custom"
    peak_tflops: dict[str, PositiveFloat]        # precision -> dense TFLOP/s, e.g. {bf16 = 989}
    hbm_GB: PositiveFloat                         # GiB of device memory
    hbm_GBps: PositiveFloat
    intra_node_GBps: PositiveFloat
    inter_node_GBps: PositiveFloat
    device: Literal["cuda", "cpu"] = "cuda"

    def to_gpu(self) -> GPU:
        return GPU(self.name, {k: v * 1e12 for k, v in self.peak_tflops.items()}, int(self.hbm_GB * GiB),
                   self.hbm_GBps, self.intra_node_GBps, self.inter_node_GBps, device=self.device)


class ClusterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    gpu: str = "H100-SXM"
    gpus_per_node: PositiveInt = 8
    nodes: PositiveInt = 1
    intra_node_GBps: PositiveFloat | None = None   # per GPU, one direction; None: the catalog's
    inter_node_GBps: PositiveFloat | None = None
    intra_node_latency_s: PositiveFloat | None = None
    inter_node_latency_s: PositiveFloat | None = None
    price_per_gpu_hour: PositiveFloat | None = None   # USD, for cost to train
    custom_gpu: CustomGPU | None = None

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    def resolve_gpu(self) -> GPU:
        """The GPU with this cluster's overrides applied (validated to exist before this is called)."""
        base = self.custom_gpu.to_gpu() if self.custom_gpu else lookup(self.gpu)
        assert base is not None, "validate the spec before resolving its GPU"
        import dataclasses
        return dataclasses.replace(
            base,
            intra_node_GBps=self.intra_node_GBps or base.intra_node_GBps,
            inter_node_GBps=self.inter_node_GBps or base.inter_node_GBps,
            intra_node_latency_s=self.intra_node_latency_s or base.intra_node_latency_s,
            inter_node_latency_s=self.inter_node_latency_s or base.inter_node_latency_s,
            price_per_gpu_hour=self.price_per_gpu_hour or base.price_per_gpu_hour,
        )


class TrainingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    global_batch: PositiveInt                       # sequences per optimizer step
    micro_batch: PositiveInt = 1
    precision: Precision = "bf16"                   # mixed precision keeps fp32 master weights
    grad_dtype: Literal["fp32", "bf16"] = "fp32"    # gradient accumulation/reduction buffers (Megatron: fp32)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    # Activation recomputation: "none"; "selective" = Korthikanti et al. 2022 §4.2 (recompute the attention core);
    # "op" = torchtitan's per-op selective AC (activation_checkpoint.mode = "selective", selective_ac_option =
    # "op"): each layer keeps its input, the outputs of every other matmul (1st, 3rd, ...: Q, V, gate/up-in, down
    # projections) and the attention kernel's outputs (out, log-sum-exp), and recomputes the rest in the backward;
    # "full" = keep only each layer's input (Chen et al. 2016). Memory: simulator/activations.py.
    recompute: Literal["none", "selective", "op", "full"] = "selective"
    tokens: PositiveFloat | None = None             # total training tokens, for time and cost to train
    lr: PositiveFloat = 3e-4
    min_lr: float = Field(default=3e-5, ge=0)
    lr_schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: NonNegativeInt = 0
    decay_fraction: float = Field(default=0.2, ge=0, le=1)   # WSD: final fraction of steps that decays
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, ge=0)     # 0 disables clipping
    seed: int = 0


class ParallelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    dp: PositiveInt = 1
    tp: PositiveInt = 1
    pp: PositiveInt = 1
    cp: PositiveInt = 1
    sp: bool = False                                # sequence parallel (needs tp > 1)
    zero: Literal[0, 1, 2, 3] = 0
    schedule: Literal["afab", "1f1b", "interleaved"] = "1f1b"
    vpp: PositiveInt = 1                            # virtual stages (model chunks) per rank, interleaved only
    # Layers that pp·vpp does not divide: the first and last virtual stages (which also hold the embedding and
    # the head) get fewer layers, as Llama 3 405B does (126 layers on 16 stages). Off by default: an uneven
    # split must be asked for, not stumbled into.
    uneven_split: bool = False
    # Mesh order from outermost to innermost: the innermost dimension gets adjacent ranks (inside a node).
    mesh: tuple[Literal["pp", "dp", "cp", "tp"], ...] = ("pp", "dp", "cp", "tp")
    bucket_MB: PositiveFloat = 25.0                 # DP gradient bucket size (PyTorch DDP's default 25 MiB)
    # Megatron-LM's communication overlaps, modelled by the simulator and exported, not run by `loom run`
    # (docs/plan_ir.md, "Overlap options"): TP collectives inside their GEMMs (--tp-comm-overlap,
    # TransformerEngine userbuffers; needs sp) and the distributed optimizer's parameter all-gather hidden
    # behind the next step's forward (--overlap-param-gather; needs zero >= 1).
    tp_comm_overlap: bool = False
    overlap_param_gather: bool = False

    @property
    def size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def degree(self, dim: str) -> int:
        return getattr(self, dim)


class VerifySpec(BaseModel):
    """[verify]: relative tolerances of `loom verify` (0 = exact; a number is a fraction, 0.1 = 10 %). Unset
    fields keep these defaults (loom.verify.DEFAULT_TOLERANCES is this table); bubble and exposed_comm are
    reported, not judged, unless set."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    comm_bytes: NonNegativeFloat = 0.0
    model_states: NonNegativeFloat = 0.0         # parameter, gradient and optimizer bytes
    activations: NonNegativeFloat = 0.03
    peak_memory: NonNegativeFloat = 0.05         # CUDA only
    step_time_gpu: NonNegativeFloat = 0.10       # also tokens/s
    step_time_cpu: NonNegativeFloat = 0.25
    bubble: NonNegativeFloat | None = None
    exposed_comm: NonNegativeFloat | None = None


class Spec(BaseModel):
    """A whole spec. `parallel` is "auto" when the user asks Loom to search for the plan."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: ModelSpec
    cluster: ClusterSpec
    training: TrainingSpec
    parallel: ParallelSpec | Literal["auto"] = "auto"
    data: DataSpec | None = None                    # executor only; None: the built-in stdlib corpus
    run: RunSpec = RunSpec()                        # executor only: steps, logging, checkpoints
    verify: VerifySpec = VerifySpec()               # loom verify's tolerances

    @property
    def world_size(self) -> int:
        return self.cluster.world_size

    @property
    def plan(self) -> ParallelSpec:
        if self.parallel == "auto":
            raise ValueError("this spec has parallel = \"auto\": search for a plan first (loom search)")
        return self.parallel

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step on each DP replica (gradient accumulation steps)."""
        return self.training.global_batch // (self.plan.dp * self.training.micro_batch)

    @property
    def tokens_per_step(self) -> int:
        return self.training.global_batch * self.model.seq_len

    @property
    def gpu(self) -> GPU:
        return self.cluster.resolve_gpu()

    def with_parallel(self, **changes) -> "Spec":
        """A copy with other parallel settings (used by search and by property tests). Not validated."""
        base = self.plan.model_dump() if self.parallel != "auto" else {}
        return self.model_copy(update={"parallel": ParallelSpec(**{**base, **changes})})
