"""Per-op selective activation checkpointing (`training.recompute = "op"`): torchtitan's policy, run with
torch.utils.checkpoint's selective checkpoint API.

torchtitan (torchtitan/models/llama3/infra/parallelize.py @42b0beb, June 2025; torchtitan/parallelisms/
parallelize_llama.py @d4c86e37, Jan 2025) wraps each transformer block in a non-reentrant checkpoint whose
context_fn is `create_selective_checkpoint_contexts(policy)`: the outputs of ops in `_save_list` (aten.mm, SDPA
flash/efficient attention, functional reduce_scatter, aten.max) are MUST_SAVE, everything else PREFER_RECOMPUTE,
and of the mm calls only every second one is saved (a counter per block forward, kept separately for the
recompute so both passes pick the same ones). In a Llama block that keeps Q, V, gate (w1) and down (w2) and the
attention's (out, lse); K, the output projection, up (w3), the norms, RoPE and SwiGLU are recomputed.

Loom's block runs the same matmuls (F.linear -> aten.mm, or aten.addmm with a bias: counted alike). Its attention
is loom.kernels' FlashAttention (Triton on CUDA, torch twin on CPU), which no aten op stands for, so here it is
wrapped in one custom op, `loom_exec::attention` -> (out, lse), that the policy can save as torchtitan saves SDPA.
Its backward is the kernel's own (dq, dk, dv from q, k, v, out, lse: FlashAttention-2, Dao 2023, Alg. 2), so the
op saves exactly what the kernel saves. Collectives are recomputed (torchtitan also saves reduce_scatter outputs
under SP; Loom's TP collectives are in-place c10d calls inside autograd Functions, and the plan lists their rerun
as for full recompute). simulator/activations.py `op_layer_bytes` counts what this keeps; tests/test_sac_*.py
check both against each other.
"""
from __future__ import annotations

from collections import defaultdict
from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import loom.kernels as K


@torch.library.custom_op("loom_exec::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of causal softmax attention, layout (batch, heads, seq, head_dim), GQA allowed."""
    out, lse = K.flash_attention_forward(q, k, v, causal)
    if out.stride() != q.stride():
        # out in q's (sequence-first) memory layout, as loom.kernels' attention writes it (kernels/_dispatch.py
        # alloc_like; on CPU flash_attention_forward's reference returns it head-major): the block then reshapes
        # it into the output projection's input as a view, so the recompute rebuilds one storage, not two.
        out = torch.empty_like(q, dtype=out.dtype).copy_(out)
    return out, lse


@attention.register_fake
def _(q, k, v, causal=True):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _setup(ctx, inputs, output) -> None:
    q, k, v, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal = causal


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = K.flash_attention_backward(dout, q, k, v, out, lse, ctx.causal, dlse=dlse)
    return dq, dk, dv, None


attention.register_autograd(_backward, setup_context=_setup)


def attention_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention.core under the per-op policy: the output of the savable op."""
    return attention(q, k, v, True)[0]


_MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
_SAVED = (torch.ops.loom_exec.attention.default,)


def _policy(counts: dict, ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """MUST_SAVE the attention op and the 1st, 3rd, 5th, ... matmul of a block's forward (and of its recompute,
    counted apart so both passes agree); PREFER_RECOMPUTE everything else."""
    if func in _MATMULS:
        key = "recompute" if ctx.is_recompute else "forward"
        counts[key] += 1
        return CheckpointPolicy.MUST_SAVE if counts[key] % 2 == 1 else CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE if func in _SAVED else CheckpointPolicy.PREFER_RECOMPUTE


def context_fn():
    """A fresh policy (fresh counters) for each checkpointed block call. allow_cache_entry_mutation: under TP
    the down projection's saved output is the partial sum leave_tp all-reduces in place (executor/tp.py); no
    backward reads it (the matmul's backward needs its input and weight), so the mutation is harmless."""
    return create_selective_checkpoint_contexts(partial(_policy, defaultdict(int)),
                                                allow_cache_entry_mutation=True)


def run(block, *args):
    """One block's forward under the per-op policy (non-reentrant checkpoint; the recompute stops early)."""
    return checkpoint(block, *args, use_reentrant=False, context_fn=context_fn)
