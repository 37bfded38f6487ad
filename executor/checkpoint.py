"""Checkpoints with torch.distributed.checkpoint (DCP): every rank saves its own shards in parallel.

Keys name the layout coordinates of what a rank holds (Trainer.state_dict): "pp{s}.tp{t}.u{i}.{param,m,v}" for
units replicated over DP (ZeRO-0: DCP writes each once) and "pp{s}.tp{t}.dp{d}.u{i}.*" for DP shards (ZeRO >= 1;
under pp/cp d is the rank in the dp x cp group); "param" is the fp32 master, m and v the optimizer's moments.
Step, data position (sequences consumed), optimizer step count and loss scale are tensors, so nothing but tensors
is stored; rank 0 also writes the writer's spec as loom_spec.json (executor/reshard.py SPEC_FILE), before DCP's
.metadata, which marks a complete checkpoint. A checkpoint loads key for key only under the layout that wrote it
(a per-stage fingerprint tensor is checked); another layout resumes from a resharded copy: executor/reshard.py
rebuilds every parameter's full master and moments from the units and writes the new layout's keys into a sibling
directory `step_XXXXXXXX.<layout tag>` (`resharded_dir`), which `loom run` does by itself when [parallel] changed.

DCP's own metadata file is a pickle; it is read here with an unpickler that only admits DCP's metadata classes
and plain containers, and tensor data goes through torch.load(weights_only=True) inside DCP.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

_SAFE_MODULES = ("torch.distributed.checkpoint.",)
_SAFE_NAMES = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str",
                                         "bytes", "bool", "slice", "complex")} | {
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"), ("torch", "layout"),
    ("torch", "memory_format"), ("torch", "dtype"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}
_TORCH_ATTRS = re.compile(r"^(float|bfloat|half|int|uint|bool|complex|double|long|short|strided|sparse|"
                          r"contiguous_format|channels_last|preserve_format)")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith(_SAFE_MODULES) or (module, name) in _SAFE_NAMES or \
                (module == "torch" and _TORCH_ATTRS.match(name)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which Loom does not load")


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata unpickling admits only DCP metadata classes."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def step_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:08d}"


_STEP_DIR = re.compile(r"^step_\d{8}$")


def latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint the run wrote (DCP writes .metadata last); resharded copies
    (`resharded_dir`) are not counted: they are derived from one of these."""
    root = Path(out_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if _STEP_DIR.match(p.name) and (p / ".metadata").exists()) \
        if root.exists() else []
    return done[-1] if done else None


def resharded_dir(path: Path, tag: str) -> Path:
    """Where checkpoint `path` resharded to the layout tagged `tag` lives (a sibling directory)."""
    return path.with_name(f"{path.name}.{tag}")


def complete(path: Path) -> bool:
    return (Path(path) / ".metadata").exists()


def save(state: dict[str, torch.Tensor], path: Path, process_group=None, no_dist: bool = False) -> None:
    """`no_dist`: one process writes the whole checkpoint without a process group (executor/reshard.py)."""
    dcp.save(state, checkpoint_id=str(path), process_group=process_group, no_dist=no_dist)


def load(state: dict[str, torch.Tensor], path: Path, process_group=None, no_dist: bool = False) -> None:
    """Fills the tensors of `state` (only its keys are read)."""
    dcp.load(state, checkpoint_id=str(path), storage_reader=SafeReader(str(path)), process_group=process_group,
             no_dist=no_dist)
