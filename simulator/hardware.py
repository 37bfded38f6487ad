"""HardwareProfile: what a GPU really achieves, as efficiencies on top of the catalog's datasheet peaks.

`loom calibrate` can replace any field with measured values (`HardwareProfile.from_dict`). Defaults and sources:
- GEMM: efficiency = gemm_eff_max · x / (x + gemm_half_dim), x = the smallest GEMM dimension. The cap is the
  best measured bf16 matmul ("maximum achievable matmul FLOPS", ml-engineering compute/accelerator/README.md,
  MAMF table: A100 SXM 267.9/312 = 0.859, H100 SXM 792.1/989 = 0.801); H200 shares H100's tensor cores and power
  limit, so it takes H100's cap (the shared baseline measured 745 TFLOP/s = 0.753 on one shape, torch 2.11,
  shared/reference/h200_torch_baseline_2026-11-28.json, consistent with a shape loss of a few %). B200 has no
  public MAMF figure in our sources: H100's fraction, an assumption. The half-saturation dimension 128 says that
  a GEMM whose smallest side is 1024 runs at 89 % of the cap (wave/tile quantisation; an assumption to calibrate).
- Attention (causal FLOPs counted as half the square, the FlashAttention convention, as in ModelSpec):
  efficiency = attn_eff_max · s/(s + attn_half_seq) · d/(d + attn_half_dim), s the per-rank sequence of one
  call and d the head dim. Default kernel: FlashAttention-2 (torch SDPA's flash backend, what MosaicML and
  torchtitan run). Its three constants reproduce the baseline's flash-backend fwd+bwd on H200 exactly (209 TFLOP/s
  at s=2048 d=128, 280 at s=8192 d=128, 189 at s=2048 d=64: 0.211, 0.283, 0.191 of 989.4): FA2 is not tuned for
  Hopper and caps near 0.36 there (FA3 paper, Shah et al. 2024 §4.1, reports the same 35 % for FA2 on H100).
  A100 caps at 0.72 (FlashAttention-2 paper, Dao 2023, §4.1: fwd+bwd up to 225 TFLOP/s of 312) with the same
  shape constants. `ATTENTION_KERNELS["cudnn_hopper"]` holds the baseline's cuDNN fit (354 / 515 / 291 TFLOP/s
  at the same shapes, exact) for stacks that use it (Megatron-LM with TransformerEngine).
- Elementwise traffic: the compiler counts the HBM bytes of *fused* norms, activations, residuals and RoPE.
  Eager PyTorch runs each of them as separate kernels (casts, fp32 upcasts in norms, transposes around attention)
  and moves more. `elementwise_traffic` multiplies the forward/backward/recompute bytes; its default 2.84 is the
  one value that makes the simulator reproduce the shared H200 baseline's eager step (Llama 1.5B, 0.180 s); with
  1.0 the simulator gives 0.142 s against the baseline's torch.compile step of 0.141 s, an independent check of
  the fused accounting (tests/test_sim_calibration.py). Set it to 1.0 for compiled/fused stacks.
- HBM: memory-bound ops reach hbm_efficiency of the datasheet bandwidth (baseline: device copy 4.06 of 4.8 TB/s
  = 0.846).
- Network: comm_efficiency = achieved bus bandwidth / link bandwidth for large messages. 0.8 is an assumption in
  line with nccl-tests bus bandwidths people publish for NVLink systems (busBW definition: nccl-tests
  doc/PERFORMANCE.md); calibrate it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from loom.spec.gpus import GPU

_GEMM_CAP = {"A100-40GB": 0.859, "A100-80GB": 0.859, "H100-SXM": 0.801, "H200": 0.801, "B200": 0.801}
# (attn_eff_max, attn_half_seq, attn_half_dim), fitted as the module docstring says.
ATTENTION_KERNELS = {"flash2_hopper": (0.357, 1049.0, 15.1), "flash2_ampere": (0.72, 1049.0, 15.1),
                     "cudnn_hopper": (0.779, 1459.0, 34.7)}
_ATTN = {"A100-40GB": "flash2_ampere", "A100-80GB": "flash2_ampere", "H100-SXM": "flash2_hopper",
         "H200": "flash2_hopper", "B200": "flash2_hopper"}


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_flops: dict[str, float]
    hbm_GBps: float
    intra_node_GBps: float
    inter_node_GBps: float
    intra_node_latency_s: float
    inter_node_latency_s: float
    gemm_eff_max: float = 0.801
    gemm_half_dim: float = 128.0
    attn_eff_max: float = 0.357
    attn_half_seq: float = 1049.0
    attn_half_dim: float = 15.1
    hbm_efficiency: float = 0.846
    comm_efficiency: float = 0.8
    elementwise_traffic: float = 2.84    # eager PyTorch; 1.0 = fused (torch.compile)
    compute_overhead_s: float = 0.0      # fixed cost per layer per compute op (kernel launches); calibrate

    @classmethod
    def from_gpu(cls, gpu: GPU) -> "HardwareProfile":
        cpu = gpu.device == "cpu"
        a_max, a_seq, a_dim = ATTENTION_KERNELS[_ATTN.get(gpu.name, "flash2_hopper")]
        return cls(name=gpu.name, peak_flops=dict(gpu.peak_flops), hbm_GBps=gpu.hbm_GBps,
                   intra_node_GBps=gpu.intra_node_GBps, inter_node_GBps=gpu.inter_node_GBps,
                   intra_node_latency_s=gpu.intra_node_latency_s, inter_node_latency_s=gpu.inter_node_latency_s,
                   gemm_eff_max=_GEMM_CAP.get(gpu.name, 0.5 if cpu else 0.801),
                   attn_eff_max=0.3 if cpu else a_max, attn_half_seq=a_seq, attn_half_dim=a_dim)

    @classmethod
    def resolve(cls, gpu: GPU, profile: "HardwareProfile | dict | None") -> "HardwareProfile":
        """The catalog defaults for `gpu` with a calibrated profile (dataclass or dict of fields) on top."""
        if isinstance(profile, HardwareProfile):
            return profile
        base = cls.from_gpu(gpu)
        if not profile:
            return base
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(profile) - known
        if unknown:
            raise ValueError(f"unknown hardware profile fields {sorted(unknown)}; known: {sorted(known)}")
        return dataclasses.replace(base, **profile)

    def peak(self, precision: str) -> float:
        return self.peak_flops[precision]

    # ---- files written by `loom calibrate` (JSON; a "meta" object with device, date, versions is kept aside) ----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path, meta: dict | None = None) -> None:
        import json
        from pathlib import Path
        Path(path).write_text(json.dumps({"profile": self.to_dict(), "meta": meta or {}}, indent=2))

    @classmethod
    def load(cls, path) -> "HardwareProfile":
        """A profile file: {"profile": {every field}, "meta": {...}}, or a plain object of fields. Fields left out
        take the catalog defaults of the GPU named by "name" (or of "gpu" in meta)."""
        import json
        from pathlib import Path
        from loom.spec.gpus import lookup
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"not a JSON hardware profile ({e})") from None
        fields = data.get("profile", data) if isinstance(data, dict) else None
        if not isinstance(fields, dict):
            raise ValueError('expected a JSON object {"profile": {...}}')
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"unknown hardware profile fields {sorted(unknown)}; known: {sorted(known)}")
        name = fields.get("name") or data.get("meta", {}).get("gpu")
        gpu = lookup(name) if isinstance(name, str) else None
        if gpu is not None:
            return dataclasses.replace(cls.from_gpu(gpu), **fields)
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - set(fields)
        if missing:
            raise ValueError(f"profile for {name!r} (not in the catalog) lacks {sorted(missing)}")
        return cls(**fields)

    def gemm_efficiency(self, m: float, n: float, k: float) -> float:
        x = min(m, n, k)
        return self.gemm_eff_max * x / (x + self.gemm_half_dim)

    def attention_efficiency(self, seq: float, head_dim: float) -> float:
        return (self.attn_eff_max * seq / (seq + self.attn_half_seq) * head_dim / (head_dim + self.attn_half_dim))
