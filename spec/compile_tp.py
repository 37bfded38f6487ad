"""The TP/SP collectives each compute op of a chunk issues, as (kind, count, message bytes[, overlap method, GEMM
FLOPs per call, splits]) lists: plain (all-reduces, or SP all-gather/reduce-scatter pairs) and, with
`parallel.tp_comm_overlap`, split by the GEMM each hides in. compile_compute.py emits them after their compute op.
- TP (Megatron-LM, Shoeybi et al. 2019 §3): per layer 2 all-reduces of b·(s/c)·h in the forward (after attention
  and MLP) and 2 in the backward; with sequence parallel each becomes an all-gather + reduce-scatter pair
  (Korthikanti et al. 2022 §4.2.2), i.e. 2 AG + 2 RS per layer per pass, and the backward all-gathers the QKV
  and FC1 inputs again from the shards they saved (same §: 2 more AG per layer, 1 for the LM head input). Plus
  what the executor issues around the layers: the vocab-parallel embedding's reduction (forward; SP:
  reduce-scatter forward, all-gather backward), the LM head input's entry (backward all-reduce; SP: all-gather
  forward, reduce-scatter backward) and the vocab-parallel cross-entropy's 3 all-reduces of one fp32 per token.
  Full and op recompute repeat the forward's up to torch checkpoint's early stop: 1 all-reduce per layer (SP: 2 AG
  + 1 RS).
"""
from __future__ import annotations

from .compile_sizes import _Shapes
from .plan import OpKind


def tp_ops(sh: _Shapes, kind: OpKind, n: int, first: bool, last: bool) -> list[tuple]:
    """The TP/SP collectives a compute op issues (executor/tp.py's conjugate operators, per layer two
    TP regions, each entered and left; Shoeybi et al. 2019 §3, Korthikanti et al. 2022 §4.2.2):
    - forward: per layer 2 leaves (all-reduce; SP reduce-scatter) and, with SP, 2 entries (all-gather);
      the vocab-parallel embedding leaves TP once (first virtual stage) and, with SP, the LM head's
      input enters once (all-gather, last); the cross-entropy's 3 all-reduces of one fp32 per token;
    - backward: the conjugates: per layer 2 entries (all-reduce; SP reduce-scatter) and, with SP, 2
      leaves (all-gather); the LM head input's entry (last) and, with SP, the embedding's leave (first);
      with SP also the re-gathers of the column-parallel linears' saved input shards (Korthikanti et
      al. 2022 §4.2.2; executor/tp.py column_parallel_linear): per layer 2 (QKV, FC1) and the LM head's;
    - full recompute: torch.utils.checkpoint (non-reentrant) stops the rerun once the last saved
      tensor is rebuilt (`_checkpoint_early_stop`), so the MLP's leave, the layer's last collective,
      is not repeated: 1 all-reduce per layer; SP: 2 all-gathers and 1 reduce-scatter.
    With tp_comm_overlap the per-layer SP collectives are split by the GEMM they hide in (tp_overlap_ops)."""
    par, recompute = sh.par, sh.train.recompute
    if par.tp_comm_overlap:
        return tp_overlap_ops(sh, kind, n, first, last)
    act, fst, lst = sh.act_msg, int(first), int(last)
    if kind == OpKind.FORWARD:
        ops = [(OpKind.SP_ALLGATHER, 2 * n + lst, act), (OpKind.SP_REDUCESCATTER, 2 * n + fst, act)] \
            if par.sp else [(OpKind.TP_ALLREDUCE, 2 * n + fst, act)]
        return ops + ([(OpKind.TP_ALLREDUCE, 3, sh.ce_msg)] if last else [])
    if kind == OpKind.BACKWARD:
        return [(OpKind.SP_ALLGATHER, 4 * n + fst + lst, act),
                (OpKind.SP_REDUCESCATTER, 2 * n + lst, act)] \
            if par.sp else [(OpKind.TP_ALLREDUCE, 2 * n + lst, act)]
    if recompute not in ("full", "op"):        # op: the same early stop (the down projection's
        return []                              # input is the last tensor rebuilt)
    return [(OpKind.SP_ALLGATHER, 2 * n, act), (OpKind.SP_REDUCESCATTER, n, act)] if par.sp \
        else [(OpKind.TP_ALLREDUCE, n, act)]


def tp_overlap_ops(sh: _Shapes, kind: OpKind, n: int, first: bool, last: bool) -> list[tuple]:
    """SP collectives with TransformerEngine's default userbuffers overlaps (transformer_engine/
    pytorch/module/base.py, initialize_ub: methods and get_default_config), one op per GEMM partner,
    as (kind, count, msg, method, GEMM FLOPs per call, splits):
    - forward: the all-gathers before QKV and FC1 by ring exchange with those GEMMs ("qkv_fprop",
      "fc1_fprop": num_splits = tp); the reduce-scatters after the output projection and FC2
      pipelined in 4 chunks ("proj_fprop", "fc2_fprop": num_splits 4);
    - backward: the all-gathers of the output gradient by ring exchange with the proj/FC2 dgrad GEMMs
      ("proj_dgrad", "fc2_dgrad"); the reduce-scatters of the QKV/FC1 input gradient in bulk beside
      their wgrad GEMMs ("qkv_wgrad", "fc1_wgrad") and the re-gathers of their saved input shards in
      bulk beside their dgrad GEMMs ("qkv_dgrad", "fc1_dgrad"); the LM head's re-gather unoverlapped;
    - full recompute reruns the forward's up to the early stop (QKV, FC1 all-gathers; proj's RS);
      "op" recompute (torchtitan's per-op policy) reruns them without the overlap.
    The embedding's, the LM head input's and the cross-entropy's collectives are not in TE layers
    (Megatron's own VocabParallelEmbedding / ColumnParallelLinear): not overlapped."""
    recompute, toks = sh.train.recompute, sh.tokens / sh.shard
    act, fst, lst, tp, g = sh.act_msg, int(first), int(last), sh.tp, sh.gemm_f
    AG, RS = OpKind.SP_ALLGATHER, OpKind.SP_REDUCESCATTER
    if kind == OpKind.FORWARD:
        ops = [(AG, n, act, "ring", toks * g["qkv"], tp), (AG, n, act, "ring", toks * g["fc1"], tp),
               (AG, lst, act, "", 0.0, 1), (RS, n, act, "pipeline", toks * g["proj"], 4),
               (RS, n, act, "pipeline", toks * g["fc2"], 4), (RS, fst, act, "", 0.0, 1)]
        return ops + ([(OpKind.TP_ALLREDUCE, 3, sh.ce_msg, "", 0.0, 1)] if last else [])
    if kind == OpKind.BACKWARD:
        return [(AG, n, act, "ring", toks * g["proj"], tp), (AG, n, act, "ring", toks * g["fc2"], tp),
                (AG, n, act, "bulk", toks * g["qkv"], 1), (AG, n, act, "bulk", toks * g["fc1"], 1),
                (AG, fst + lst, act, "", 0.0, 1), (RS, n, act, "bulk", toks * g["qkv"], 1),
                (RS, n, act, "bulk", toks * g["fc1"], 1), (RS, lst, act, "", 0.0, 1)]
    if recompute == "op":        # torchtitan's policy (no TE equivalent): charged unoverlapped
        return [(AG, 2 * n, act, "", 0.0, 1), (RS, n, act, "", 0.0, 1)]
    if recompute != "full":
        return []
    return [(AG, n, act, "ring", toks * g["qkv"], tp), (AG, n, act, "ring", toks * g["fc1"], tp),
            (RS, n, act, "pipeline", toks * g["proj"], 4)]
