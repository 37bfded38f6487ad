"""loom calibrate: the fitters recover known constants from synthetic data, and a 5-second run on this CPU writes a
profile that HardwareProfile.load reads and the simulator accepts."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest

from loom.calibrate import fit_collectives
from loom.calibrate_fit import (collective_steps, fit_alpha_beta, fit_attention, fit_saturation, linear_fit,
                                wire_bytes)


def test_alpha_beta_fit_recovers_known_constants():
    alpha, beta, steps = 25e-6, 12e9, 4                         # 25 µs per step, 12 GB/s
    rng = random.Random(0)
    sizes = [4096 * 4 ** i for i in range(7)]
    wire = [wire_bytes("all_reduce", 4, b) for b in sizes]
    t = [(alpha * steps + w / beta) * (1 + 0.01 * rng.uniform(-1, 1)) for w in wire]   # 1 % noise
    ab = fit_alpha_beta(wire, t, steps)
    assert ab.alpha_s == pytest.approx(alpha, rel=0.05)
    assert ab.beta_Bps == pytest.approx(beta, rel=0.02)
    assert ab.time(wire[3]) == pytest.approx(alpha * steps + wire[3] / beta, rel=0.02)


def test_alpha_beta_exact_without_noise():
    ab = fit_alpha_beta([1e3, 1e6, 1e7], [1e-5 + 1e3 / 2e9, 1e-5 + 1e6 / 2e9, 1e-5 + 1e7 / 2e9], steps=1)
    assert ab.alpha_s == pytest.approx(1e-5, rel=1e-9) and ab.beta_Bps == pytest.approx(2e9, rel=1e-9)


def test_fit_collectives_groups_by_kind_and_size_and_uses_the_simulators_steps():
    alpha, beta = 1e-4, 1e9
    rows = []
    for kind in ("all_reduce", "all_gather", "send"):
        for n in (2, 4):
            for b in (4096, 65536, 1048576):
                rows.append({"kind": kind, "group": n, "bytes": b,
                             "time_s": alpha * collective_steps(kind, n) + wire_bytes(kind, n, b) / beta})
    fits = fit_collectives(rows)
    assert len(fits) == 6
    for f in fits:
        assert f["alpha_s"] == pytest.approx(alpha, rel=1e-6) and f["beta_GBps"] == pytest.approx(1.0, rel=1e-6)
    assert collective_steps("all_reduce", 8) == 6 and collective_steps("all_gather", 8) == 3   # simulator/costs.py
    assert wire_bytes("all_reduce", 4, 100) == 150 and wire_bytes("reduce_scatter", 4, 100) == 75


def test_saturation_fit_recovers_the_gemm_curve():
    e_max, half = 0.8, 128.0
    xs = [64, 128, 256, 512, 1024, 4096]
    e_max_fit, half_fit = fit_saturation(xs, [e_max * x / (x + half) for x in xs])
    assert e_max_fit == pytest.approx(e_max, rel=1e-9) and half_fit == pytest.approx(half, rel=1e-9)


def test_attention_fit_recovers_the_hardware_defaults():
    from loom.simulator.hardware import ATTENTION_KERNELS
    a, hs, hd = ATTENTION_KERNELS["flash2_hopper"]
    seqs, dims = [], []
    for d in (64, 128):
        for s in (512, 1024, 2048, 4096, 8192):
            seqs.append(s)
            dims.append(d)
    eff = [a * s / (s + hs) * d / (d + hd) for s, d in zip(seqs, dims)]
    a_fit, hs_fit, hd_fit = fit_attention(seqs, dims, eff)
    pred = [a_fit * s / (s + hs_fit) * d / (d + hd_fit) for s, d in zip(seqs, dims)]
    assert max(abs(p - e) / e for p, e in zip(pred, eff)) < 1e-3
    assert hs_fit == pytest.approx(hs, rel=0.05) and hd_fit == pytest.approx(hd, rel=0.05)
    assert a_fit == pytest.approx(a, rel=0.02)


def test_linear_fit_needs_two_distinct_points():
    with pytest.raises(ValueError):
        linear_fit([1.0], [2.0])
    with pytest.raises(ValueError):
        linear_fit([1.0, 1.0], [2.0, 3.0])


def test_profile_load_errors_name_the_problem(tmp_path):
    from loom.simulator.hardware import HardwareProfile
    p = tmp_path / "p.json"
    p.write_text('{"profile": {"name": "cpu", "gemm_eff": 0.5}}')
    with pytest.raises(ValueError, match="gemm_eff"):
        HardwareProfile.load(p)
    p.write_text("not json")
    with pytest.raises(ValueError, match="JSON"):
        HardwareProfile.load(p)
    p.write_text('{"profile": {"name": "H200", "gemm_eff_max": 0.7}}')
    prof = HardwareProfile.load(p)
    assert prof.gemm_eff_max == 0.7 and prof.hbm_GBps == 4800          # catalog defaults under the measured field


def test_calibrate_cli_writes_a_profile_the_simulator_accepts(tmp_path):
    out = tmp_path / "cpu.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "loom.cli", "calibrate", "--seconds", "5", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=180)
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["torch"] and meta["date"] and meta["device"] == "cpu" and meta["collectives"]["backend"] == "gloo"
    assert meta["gemm"] and meta["collectives"]["fits"], "no GEMM shapes or collective fits measured"
    assert meta["elapsed_s"] < 45, "the 5 s budget was not respected (one full collective sweep and rank start-up may exceed it)"
    from loom.simulator import simulate_time
    from loom.simulator.hardware import HardwareProfile
    from loom.spec import load_spec
    prof = HardwareProfile.load(out)
    assert 0 < prof.gemm_eff_max <= 1 and prof.hbm_GBps > 0 and prof.intra_node_GBps > 0
    spec = load_spec(os.path.join(os.path.dirname(__file__), "..", "examples", "tiny-cpu.toml"))
    r = simulate_time(spec, profile=prof)
    assert math.isfinite(r.step_time_s) and r.step_time_s > 0
    assert r.step_time_s != simulate_time(spec).step_time_s                  # the profile is used


def test_catalog_name_for_cuda_devices():
    from loom.calibrate import catalog_name
    from loom.spec.gpus import lookup
    assert catalog_name("NVIDIA H100 80GB HBM3", 80 * 2**30) == "H100-SXM"
    assert catalog_name("NVIDIA H200", 141 * 2**30) == "H200"
    assert catalog_name("NVIDIA A100-SXM4-40GB", 40 * 2**30) == "A100-40GB"
    assert catalog_name("NVIDIA A100-SXM4-80GB", 80 * 2**30) == "A100-80GB"
    for n in ("H100-SXM", "H200", "A100-40GB", "A100-80GB", "B200"):
        assert lookup(n) is not None
