"""loom.executor: runs a compiled plan with torch.distributed (docs/executor.md).

Entry points: `launch.run_from_cli` (loom run), `python -m loom.executor.train` (per rank), `train.Trainer`.
Modules, in the order parallelisms are applied: model/tp (TP, SP, vocab-parallel loss), dp (DP buckets, ZeRO),
optim (AdamW, clipping, schedules, loss scaling); comm (every collective, logged), mesh (DeviceMesh groups), data
(corpus, shards, per-rank batches), checkpoint (DCP). Nothing is imported here, so `import loom.executor` is cheap.
"""
