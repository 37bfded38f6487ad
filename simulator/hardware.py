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
  call and d the head dim. The three constants reproduce the baseline's cuDNN SDPA fwd+bwd on H200 (354 TFLOP/s at
  s=2048 d=128, 515 at s=8192 d=128, 291 at s=2048 d=64: 0.358, 0.520, 0.294 of 989.4) exactly. A100 caps at
  0.72 (FlashAttention-2 paper, Dao 2023, §4.1: fwd+bwd up to 225 TFLOP/s of 312) with Hopper's shape constants.
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
_ATTN_CAP = {"A100-40GB": 0.72, "A100-80GB": 0.72, "H100-SXM": 0.779, "H200": 0.779, "B200": 0.779}


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
    attn_eff_max: float = 0.779
    attn_half_seq: float = 1459.0
    attn_half_dim: float = 34.7
    hbm_efficiency: float = 0.846
    comm_efficiency: float = 0.8
    compute_overhead_s: float = 0.0      # fixed cost per layer per compute op (kernel launches); calibrate

    @classmethod
    def from_gpu(cls, gpu: GPU) -> "HardwareProfile":
        cpu = gpu.device == "cpu"
        return cls(name=gpu.name, peak_flops=dict(gpu.peak_flops), hbm_GBps=gpu.hbm_GBps,
                   intra_node_GBps=gpu.intra_node_GBps, inter_node_GBps=gpu.inter_node_GBps,
                   intra_node_latency_s=gpu.intra_node_latency_s, inter_node_latency_s=gpu.inter_node_latency_s,
                   gemm_eff_max=_GEMM_CAP.get(gpu.name, 0.5 if cpu else 0.801),
                   attn_eff_max=_ATTN_CAP.get(gpu.name, 0.3 if cpu else 0.779))

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

    def gemm_efficiency(self, m: float, n: float, k: float) -> float:
        x = min(m, n, k)
        return self.gemm_eff_max * x / (x + self.gemm_half_dim)

    def attention_efficiency(self, seq: float, head_dim: float) -> float:
        return (self.attn_eff_max * seq / (seq + self.attn_half_seq) * head_dim / (head_dim + self.attn_half_dim))
