"""Run many layouts in one process group and record what each trains to: the engine of the parity tests.

`python -m loom.executor.parity CASES.json OUT_DIR` on every rank (RANK, WORLD_SIZE, MASTER_ADDR/PORT set). A case
is {"name", "spec": {...spec dict...}, "steps", optional "resume_at"}; a layout smaller than the world runs as
world / size independent replicas (an outer "rep" mesh dimension), which must agree with each other. Rank 0
writes OUT_DIR/<name>.pt: losses, grad norms, full-size final parameters, each replica's losses, the comm log
summary, the unpadded/padded sizes of the ZeRO units and the bytes their buffers hold between steps (weights_only-loadable: tensors, lists, dicts, str).
Starting ranks once and reusing the process group keeps the whole parity suite to one ~7 s start-up.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from loom.spec import spec_from_dict

from . import comm
from .mesh import build_mesh
from .trainer import Trainer


def run_case(case: dict, out_dir: Path) -> dict:
    spec = spec_from_dict(case["spec"])
    world = dist.get_world_size()
    replicas = world // spec.plan.size
    mesh = build_mesh(spec.plan, "cpu", replicas=replicas)
    steps = case["steps"]
    comm.LOG.clear()
    tr = Trainer(spec, mesh, torch.device("cpu"), steps)
    losses, norms = [], []
    resume_at = case.get("resume_at")
    ck = Path(case["ckpt_dir"]) if resume_at else None
    while tr.step_no < steps:
        s = tr.step()
        losses.append(s.loss)
        norms.append(s.grad_norm)
        if resume_at and tr.step_no == resume_at:
            tr.save(ck)
            dist.barrier()
            tr = Trainer(spec, mesh, torch.device("cpu"), steps)     # a fresh process state, then resume
            tr.load(ck / "checkpoints" / f"step_{resume_at:08d}")
    summary = {f"{k[0]}|{k[1]}|{k[2]}": list(v) for k, v in comm.LOG.summary().items()}
    # Bytes each unit's full parameter / gradient buffers hold between steps (what ZeRO-2/3 free).
    storage = [(u.flat.untyped_storage().size(), u.grad.untyped_storage().size()) for u in tr.dp.units]
    full = tr.full_state()
    rep = mesh["rep"]
    all_losses = [None] * world
    dist.all_gather_object(all_losses, losses)
    units = [(sum(p.numel() for p in u.params), u.numel) for u in tr.dp.units]
    return {"losses": torch.tensor(losses, dtype=torch.float64), "norms": torch.tensor(norms, dtype=torch.float64),
            "params": full, "replica_losses": [torch.tensor(x, dtype=torch.float64) for x in all_losses],
            "units": units, "comm": summary, "replicas": rep.size, "storage": storage,
            "groups": {d: (dist.get_process_group_ranks(g.pg) if g.pg is not None else [dist.get_rank()])
                       for d, g in mesh.groups.items()}}


def main(argv: list[str]) -> int:
    cases = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for case in cases:
        if case.get("resume_at"):
            case["ckpt_dir"] = str(out / f"ckpt_{case['name']}")
        res = run_case(case, out)
        if dist.get_rank() == 0:
            torch.save(res, out / f"{case['name']}.pt")
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
