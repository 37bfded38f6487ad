"""The last stage's loss and LM head in the memory model (simulator/memory.py _logits_bytes), per loss
implementation: hand derivations on published runs' shapes (torchtitan's 70B 2D and H200 8B runs, Loom's 1.5B
example), the transients measured on torch's own loss code on CPU, and the compiled loss's saved set."""
from __future__ import annotations

from pathlib import Path

import pytest

from loom.simulator.activations import ActivationAssumptions
from loom.simulator.memory import _logits_bytes, memory_report
from loom.spec import ModelSpec
from tests.test_memory_model import spec

TORCHTITAN_TP = ActivationAssumptions(loss="loss_parallel", sp_gathered_head_input=True)
TORCHTITAN_COMPILED = ActivationAssumptions(loss="compiled", sp_gathered_head_input=True)


def llama3(size: str) -> dict:
    dims = {"8B": (32, 4096, 32, 14336), "70B": (80, 8192, 64, 28672)}[size]
    return {"layers": dims[0], "hidden": dims[1], "heads": dims[2], "kv_heads": 8, "ffn_hidden": dims[3],
            "vocab": 128256, "seq_len": 8192}


def test_loss_parallel_and_gathered_head_input_on_the_70b_2d_run():
    """torchtitan's 70B 2D run (docs/performance.md Table 4): TP 8 + SP, FSDP 32, local batch 16 x 8192 in one
    micro-batch, full AC. By hand, T = 131,072 tokens, v/tp = 128,256 / 8 = 16,032, h = 8,192:
    saved  = 2·T·h/8 (final-norm input, SP shard) 268,435,456 + 2·T·h (the head's all-gathered input)
             2,147,483,648 + 4·T·16,032 (fp32 log-probs, L) 8,405,385,216 = 10,821,304,320 B;
    loss backward (loss_parallel): grad_input, exp(x) and their sum beside the saved x: 3L = 25,216,155,648 B,
    larger than the recomputed layer's transient, so it is the workspace. Against the default (unfused loss,
    sharded head input) the allocation grows by 2·T·h·7/8 + L = 10,284,433,408 B, and the peak by that x 1.05."""
    s = spec(llama3("70B"), 256, {"dp": 32, "tp": 8, "sp": True, "zero": 3},
             {"global_batch": 512, "micro_batch": 16, "recompute": "full"}, gpu="H100-SXM")
    st = memory_report(s, TORCHTITAN_TP).per_stage[0]
    default = memory_report(s).per_stage[0]
    assert st.logits_buffers == 10_821_304_320
    assert st.workspace == 25_216_155_648
    assert default.workspace == 2 * 8_405_385_216
    assert st.peak - default.peak == pytest.approx(10_284_433_408 * 1.05, abs=2)
    # without SP the head's input is the (unsharded) norm output either way: only the loss changes
    no_sp = s.with_parallel(sp=False)
    assert memory_report(no_sp, ActivationAssumptions(sp_gathered_head_input=True)).peak_bytes == \
        memory_report(no_sp).peak_bytes


def test_compiled_loss_on_the_h200_8b_run():
    """torchtitan's June 2025 H200 run (8B, FSDP 32, local batch 2 x 8192, per-op SAC, torch.compile, which at
    torchtitan e7c0cae compiles the loss): T = 16,384, v = 128,256, h = 4,096, tp = 1. By hand: saved = the
    final norm's input and output 2·2·T·h = 268,435,456 + the bf16 logits 2·T·v = 4,202,692,608 + two fp32 per
    row 8·T = 131,072 → 4,471,259,136 B; transient = the bf16 logits gradient + one fp32 per row,
    4,202,692,608 + 65,536 = 4,202,758,144 B (larger than the per-op recompute transient). The default's
    saved + transient (4·T·h + 4·T·v + 2·4·T·v) is 16,810,573,824 B more."""
    s = spec(llama3("8B"), 32, {"dp": 32, "zero": 3}, {"global_batch": 64, "micro_batch": 2, "recompute": "op"},
             gpu="H200")
    st = memory_report(s, TORCHTITAN_COMPILED).per_stage[0]
    default = memory_report(s).per_stage[0]
    assert st.logits_buffers == 4_471_259_136
    assert st.workspace == 4_202_758_144
    assert (default.logits_buffers + default.workspace) - (st.logits_buffers + st.workspace) == 16_810_573_824


def test_unknown_loss_implementation_is_refused():
    with pytest.raises(ValueError, match="loss"):
        ActivationAssumptions(loss="fused")


def _allocation_profile(fn, min_bytes: int) -> tuple[int, int]:
    """(peak, end) of the bytes the CPU allocator holds while `fn` runs, relative to its start, counting only
    blocks of at least `min_bytes` (the (T, v)-sized ones): the profiler's alloc/free events in time order."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and abs(e.nbytes()) >= min_bytes)
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak, live


def test_loss_transients_match_the_torch_sources_on_cpu():
    """The multiples of L (fp32 (T, v) logits) in _logits_bytes, measured on the installed torch's own code
    (CPU allocator events; torch 2.13, the functions unchanged since loss_parallel landed in 2024). aten
    cross-entropy: the forward keeps L (log-probs) and peaks at 2L beside the bf16 logits, the backward peaks at
    3L with the saved L (transient 2L). loss_parallel's `_log_softmax` keeps L and peaks at 2L beside its fp32
    input; its fused nll/log_softmax backward peaks at 4L with the saved L (transient 3L)."""
    torch = pytest.importorskip("torch")
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss as lp

    N, V = 1024, 4000
    L = 4 * N * V
    pred = torch.randn(N, V, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, V, (N,))
    box = {}

    def aten_forward():
        box["loss"] = F.cross_entropy(pred.float(), target)
    assert _allocation_profile(aten_forward, N * V) == (2 * L, L)
    peak, end = _allocation_profile(lambda: box.pop("loss").backward(), N * V)
    assert peak == 2 * L                                  # beside the saved log-probs (L, already held)
    m = ModelSpec(layers=1, hidden=64, heads=4, ffn_hidden=128, vocab=V, seq_len=N)
    assert _logits_bytes(m, N, 1, False, 2, ActivationAssumptions(loss="unfused"))[1] == peak

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        x = pred.detach().float()

        def lp_forward():
            box["logp"] = lp._log_softmax(x, 1, False, mesh, 0)
        assert _allocation_profile(lp_forward, N * V) == (2 * L, L)      # shifted, exp(shifted); then the result
        del x

        def lp_backward():
            box["grad"] = lp._nll_loss_and_log_softmax_backward(
                torch.ones(()), box["logp"], target, None, 1, -100, torch.tensor(float(N)), box["logp"].shape, 1,
                mesh, 0)
        peak, _ = _allocation_profile(lp_backward, N * V)
        assert peak == 3 * L                              # beside the saved log-probs
        assert _logits_bytes(m, N, 1, False, 2, ActivationAssumptions(loss="loss_parallel"))[1] == peak
    finally:
        if created:
            dist.destroy_process_group()


def test_compiled_loss_saves_the_bf16_logits_and_row_statistics():
    """What torch.compile's partitioner keeps for the backward of torchtitan's loss (AOTAutograd min-cut over
    inductor's decompositions, no code generation): the bf16 logits and (N, 1) fp32 rows only, no (N, V) fp32."""
    torch = pytest.importorskip("torch")
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    N, V = 128, 1000
    saved = []

    def forward_compiler(gm, _):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        saved.extend(a.meta["val"] for a in out.args[0][1:])          # [0] is the loss
        return gm

    def ce(pred, labels):
        return torch.nn.functional.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1))

    f = aot_function(ce, fw_compiler=forward_compiler, bw_compiler=lambda gm, _: gm,
                     partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    f(torch.randn(2, N // 2, V, dtype=torch.bfloat16, requires_grad=True), torch.randint(0, V, (2, N // 2)))
    big = [t for t in saved if t.numel() >= N * V]
    assert [(t.dtype, t.numel()) for t in big] == [(torch.bfloat16, N * V)]
    rows = sum(t.numel() * t.element_size() for t in saved if t.dtype == torch.float32 and t.numel() > 1)
    assert rows == 2 * 4 * N                                                        # max and log-sum-exp
    m = ModelSpec(layers=1, hidden=64, heads=4, ffn_hidden=128, vocab=V, seq_len=N)
    saved_model, _ = _logits_bytes(m, N, 1, False, 2, ActivationAssumptions(loss="compiled"))
    assert saved_model - 2 * 2 * N * 64 == 2 * N * V + rows                         # beyond the norm's two


def test_fused_chunked_loss_by_hand_on_the_1_5b_example():
    """examples/llama-1.5b-h200.toml (one H200, bf16, micro-batch 2 x 4096 = 8192 tokens, vocab 128256, hidden
    2048, no recompute): loom.kernels' fused linear cross-entropy (what the executor runs on one GPU without TP)
    keeps the final norm's input, grad_h (2 B x T x h) and grad_W (2 B x v x h) and needs one chunk of bf16 logits
    (256 MiB / (v x 2 B) = 1046 tokens, rounded down to 64: 1024); the default unfused loss keeps the norm's input
    and output and the fp32 log-probs (4 B x T x v) and needs their two fp32 gradients."""
    from dataclasses import replace

    import torch

    from loom.kernels.fused_linear_ce import default_chunk_size
    from loom.simulator.activations import fused_ce_chunk_tokens
    from loom.simulator.memory import memory_report
    from loom.spec import load_spec
    from loom.verify_predict import EXECUTOR_ACTIVATIONS
    T, v, h = 8192, 128256, 2048
    assert fused_ce_chunk_tokens(T, v, 2) == default_chunk_size(T, v, torch.bfloat16) == 1024
    assert fused_ce_chunk_tokens(100, 50304, 4) == default_chunk_size(100, 50304, torch.float32) == 100
    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / "llama-1.5b-h200.toml")
    unfused = memory_report(spec, EXECUTOR_ACTIVATIONS).per_stage[0]
    fused = memory_report(spec, replace(EXECUTOR_ACTIVATIONS, loss="fused_chunked")).per_stage[0]
    assert unfused.logits_buffers == 2 * 2 * T * h + 4 * T * v == 4_269_801_472
    assert unfused.workspace == 2 * 4 * T * v == 8_405_385_216
    assert fused.logits_buffers == 2 * T * h + 2 * T * h + 2 * v * h == 592_445_440
    assert fused.workspace == 2 * 1024 * v == 262_668_288
    assert (fused.params, fused.activations) == (unfused.params, unfused.activations)   # only the loss moves
