"""Process groups from a DeviceMesh laid out in the spec's mesh order (outermost -> innermost).

`init_device_mesh` does the rank arithmetic: rank r sits at the row-major coordinate of r in the mesh shape, so
the innermost dimension (tp by default) gets adjacent ranks, i.e. the same node. Tests may add an outer
"rep" dimension to run several independent copies of a small layout in one larger process group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from loom.spec import ParallelSpec

from .comm import SINGLE, Group


@dataclass
class Mesh:
    device_mesh: DeviceMesh | None
    groups: dict[str, Group]            # "pp", "dp", "cp", "tp" (and "rep" in tests)

    def __getitem__(self, dim: str) -> Group:
        return self.groups.get(dim, SINGLE)

    @property
    def dp(self) -> Group:
        return self["dp"]

    @property
    def tp(self) -> Group:
        return self["tp"]

    def coords(self) -> dict[str, int]:
        return {k: g.rank for k, g in self.groups.items()}


def build_mesh(parallel: ParallelSpec, device_type: str, replicas: int = 1) -> Mesh:
    """The mesh for `parallel` over the initialised default process group (world = replicas * parallel.size)."""
    dims = list(parallel.mesh)
    shape = [parallel.degree(d) for d in dims]
    if replicas > 1:
        dims, shape = ["rep"] + dims, [replicas] + shape
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return Mesh(None, {d: Group(d, None, 1, 0) for d in dims})
    dm = init_device_mesh(device_type, tuple(shape), mesh_dim_names=tuple(dims))
    groups = {d: Group(d, dm.get_group(d) if n > 1 else None, n, dm.get_local_rank(d)) for d, n in zip(dims, shape)}
    return Mesh(dm, groups)
