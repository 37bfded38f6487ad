"""The GPU catalog: dense peak FLOP/s per precision, HBM size and bandwidth, NVLink and network defaults.

Figures are NVIDIA datasheet values for dense math (no 2:4 sparsity):
- A100 SXM (40/80 GB): NVIDIA A100 Tensor Core GPU datasheet (2021): BF16/FP16 312 TFLOPS, TF32 156,
  FP32 19.5; HBM2 1,555 GB/s (40 GB) and HBM2e 2,039 GB/s (80 GB); NVLink 3 600 GB/s bidirectional.
- H100 SXM5: NVIDIA H100 datasheet (2023): BF16/FP16 989.4 TFLOPS dense (1,979 with sparsity), FP8 1,978.9,
  TF32 494.7, FP32 66.9; HBM3 80 GB at 3.35 TB/s; NVLink 4 900 GB/s bidirectional.
- H200 SXM: NVIDIA H200 datasheet (2024): same tensor core as H100 SXM; HBM3e 141 GB at 4.8 TB/s; NVLink 900 GB/s.
- B200 (HGX B200): NVIDIA Blackwell datasheet (2024): FP16/BF16 2.25 PFLOPS dense, FP8 4.5 PFLOPS dense, FP32 75
  TFLOPS (approx.); HBM3e 180 GB at 7.7 TB/s per GPU in HGX B200; NVLink 5 1.8 TB/s bidirectional.
- InfiniBand: one 400 Gb/s NDR (ConnectX-7) HCA per GPU = 50 GB/s per direction; A100 systems: 200 Gb/s HDR = 25 GB/s.
Bandwidths in this catalog are per GPU, one direction (half of NVIDIA's bidirectional figure).

"cpu" is Loom's executor target on a machine without GPUs (gloo backend); its figures are placeholders that
`loom calibrate` replaces with measurements.
"""
from __future__ import annotations

from dataclasses import dataclass, field

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: dict[str, float]   # precision -> dense FLOP/s on the tensor cores (fp32: non-tensor FMA)
    hbm_bytes: int
    hbm_GBps: float                # device memory bandwidth, GB/s
    intra_node_GBps: float         # NVLink/NVSwitch per GPU, one direction
    inter_node_GBps: float         # network per GPU, one direction
    intra_node_latency_s: float = 5e-6   # NCCL small-message latency within a node (order of magnitude)
    inter_node_latency_s: float = 10e-6  # across nodes over InfiniBand
    device: str = "cuda"           # "cuda" or "cpu": which torch device the executor uses
    price_per_gpu_hour: float | None = None  # optional default; the spec may override
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def supports(self, precision: str) -> bool:
        return precision in self.peak_flops


_T = 1e12

CATALOG: dict[str, GPU] = {
    g.name: g
    for g in [
        GPU("A100-40GB", {"bf16": 312 * _T, "fp16": 312 * _T, "tf32": 156 * _T, "fp32": 19.5 * _T},
            hbm_bytes=40 * GiB, hbm_GBps=1555, intra_node_GBps=300, inter_node_GBps=25,
            aliases=("A100-40", "A100-SXM-40GB")),
        GPU("A100-80GB", {"bf16": 312 * _T, "fp16": 312 * _T, "tf32": 156 * _T, "fp32": 19.5 * _T},
            hbm_bytes=80 * GiB, hbm_GBps=2039, intra_node_GBps=300, inter_node_GBps=25,
            aliases=("A100-80", "A100", "A100-SXM-80GB")),
        GPU("H100-SXM", {"bf16": 989.4 * _T, "fp16": 989.4 * _T, "fp8": 1978.9 * _T, "tf32": 494.7 * _T,
                         "fp32": 66.9 * _T},
            hbm_bytes=80 * GiB, hbm_GBps=3350, intra_node_GBps=450, inter_node_GBps=50,
            aliases=("H100", "H100-80GB", "H100-SXM5")),
        GPU("H200", {"bf16": 989.4 * _T, "fp16": 989.4 * _T, "fp8": 1978.9 * _T, "tf32": 494.7 * _T,
                     "fp32": 66.9 * _T},
            hbm_bytes=141 * 10**9, hbm_GBps=4800, intra_node_GBps=450, inter_node_GBps=50,
            aliases=("H200-SXM",)),
        GPU("B200", {"bf16": 2250 * _T, "fp16": 2250 * _T, "fp8": 4500 * _T, "tf32": 1100 * _T, "fp32": 75 * _T},
            hbm_bytes=180 * 10**9, hbm_GBps=7700, intra_node_GBps=900, inter_node_GBps=50),
        GPU("cpu", {"fp32": 0.1 * _T, "bf16": 0.05 * _T},
            hbm_bytes=24 * GiB, hbm_GBps=20, intra_node_GBps=5, inter_node_GBps=1,
            intra_node_latency_s=50e-6, inter_node_latency_s=200e-6, device="cpu", aliases=("CPU",)),
    ]
}

_ALIASES = {a.lower(): g.name for g in CATALOG.values() for a in (g.name, *g.aliases)}


def lookup(name: str) -> GPU | None:
    canonical = _ALIASES.get(name.lower())
    return CATALOG[canonical] if canonical else None


def names() -> list[str]:
    return list(CATALOG)
