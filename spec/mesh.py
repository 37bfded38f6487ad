"""The device mesh: rank <-> coordinates for a mesh order, the ranks of each group, and which groups leave a node.

A mesh order names the dimensions from outermost to innermost (default pp, dp, cp, tp). Ranks are laid out
row-major in that order, so the innermost dimension gets adjacent ranks, i.e. GPUs of one node, exactly as
`torch.distributed.device_mesh.init_device_mesh("cuda", shape, mesh_dim_names=order)` lays them out (its mesh is
`arange(world).view(shape)`). The executor builds its DeviceMesh with `Mesh.shape` and `Mesh.order`; the simulator
asks `spans_nodes` / `ranks_per_node` to pick the bandwidth tier of each group.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from math import prod

DIMS = ("pp", "dp", "cp", "tp")


@dataclass(frozen=True)
class Mesh:
    order: tuple[str, ...]          # outermost -> innermost
    sizes: tuple[int, ...]          # degree of each dim, same order as `order`
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        if sorted(self.order) != sorted(DIMS):
            raise ValueError(f"mesh order {self.order} must name each of {DIMS} exactly once")
        if len(self.sizes) != len(self.order) or any(s < 1 for s in self.sizes):
            raise ValueError(f"mesh sizes {self.sizes} must be positive, one per dim of {self.order}")

    @classmethod
    def from_spec(cls, spec) -> "Mesh":
        p = spec.plan
        return cls(tuple(p.mesh), tuple(p.degree(d) for d in p.mesh), spec.cluster.gpus_per_node)

    # ---- layout --------------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return prod(self.sizes)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.sizes

    def size(self, dim: str) -> int:
        return self.sizes[self.order.index(dim)]

    def stride(self, dim: str) -> int:
        """Rank distance between neighbours along `dim`: the product of the sizes of the dims inside it."""
        i = self.order.index(dim)
        return prod(self.sizes[i + 1:])

    def coords(self, rank: int) -> dict[str, int]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a mesh of {self.world_size}")
        return {d: (rank // self.stride(d)) % self.size(d) for d in self.order}

    def rank(self, **coords: int) -> int:
        return sum(coords.get(d, 0) * self.stride(d) for d in self.order)

    def group(self, dim: str, rank: int) -> list[int]:
        """The ranks of `rank`'s group along `dim` (ordered by their coordinate on `dim`)."""
        c = self.coords(rank)
        base = rank - c[dim] * self.stride(dim)
        return [base + k * self.stride(dim) for k in range(self.size(dim))]

    def groups(self, dim: str) -> list[list[int]]:
        """All groups along `dim` (each rank in exactly one), as `new_group` would need them."""
        return [self.group(dim, r) for r in range(self.world_size) if self.coords(r)[dim] == 0]

    # ---- topology ------------------------------------------------------------------------------------------
    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    @cached_property
    def _nodes_per_group(self) -> dict[str, int]:
        # Groups along a dim are translates of each other; the group of rank 0 is representative when the node
        # size is a multiple (or divisor) of the strides, which holds for power-of-two layouts. Checked in tests.
        return {d: len({self.node_of(r) for r in self.group(d, 0)}) for d in self.order}

    def nodes_spanned(self, dim: str) -> int:
        """How many nodes one group along `dim` touches."""
        return self._nodes_per_group[dim]

    def spans_nodes(self, dim: str) -> bool:
        return self.nodes_spanned(dim) > 1

    def ranks_per_node(self, dim: str) -> int:
        """Group members that share one node (for hierarchical collectives)."""
        return -(-self.size(dim) // self.nodes_spanned(dim))
