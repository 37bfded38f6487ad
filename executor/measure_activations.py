"""Saved-activation accounting for executor/measure.py: `SavedTensors` counts the bytes kept for backward by storage
(autograd's saved tensors, torch.utils.checkpoint's inputs and recompute, the selective-checkpoint cache of
recompute = "op") through saved_tensors_hooks and its hooks into torch's checkpoint and executor/sac.py."""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


class SavedTensors:
    """Bytes kept for backward, by storage. `region` says where the forward is ("layers" inside a Block, "other"
    elsewhere); parameters and buffers are excluded (their storages are model state). Three holders are counted:
    - autograd's saved tensors (`saved_tensors_hooks`), including torch.utils.checkpoint's inputs, which it saves
      through `_NoopSaveInputs` just before calling the Block (so they are moved to "layers" when the Block's
      pre-hook sees its input among them);
    - the selective-checkpoint cache of recompute = "op" (executor/sac.py): the outputs its policy keeps are stored
      in a dict, not saved tensors; an entry is live until the recompute consumes it or the cache is freed;
    - during a backward, what a checkpoint's recompute rebuilds (torch/utils/checkpoint.py `_recomputation_hook`
      stores it per saved-tensor holder; live until the backward unpacks it).
    A storage is live from its first hold until every hold is released (one reference count per storage, whoever
    holds it), and "kept" while a forward hold (saved tensor, checkpoint input, cache entry) has it. `step` adds its
    bytes each time it becomes kept (so per micro-batch = step / micro-batches), `peak_kept` is the most bytes
    kept at once (what the schedule keeps in flight), `peak_live` the same with the recompute's holds, and
    `transient` the most live bytes a recompute adds: live bytes during a checkpoint's recompute minus live bytes
    when its backward first asked for a saved tensor (what the layer kept is already counted in the latter)."""

    def __init__(self, params: list[torch.Tensor]):
        # The storage objects, not their addresses: ZeRO-3 frees and re-allocates the flat buffers (resize_), which
        # moves their data but keeps the objects.
        self.param_storages = [p.untyped_storage() for p in params]
        self.region = "other"
        self.step: dict[str, int] = {"layers": 0, "other": 0}
        self.live: dict[tuple[int, int], int] = {}        # storage -> holds not yet released
        self.live_bytes = 0
        self.peak_live = 0
        self.kept: dict[tuple[int, int], int] = {}        # the same, forward holds only (not the recompute's)
        self.kept_bytes = 0
        self.peak_kept = 0
        self.transient = 0
        self.transient_known = True                         # False if torch's checkpoint internals moved
        self.fresh_other: dict[tuple[int, int], int] = {}  # storages kept in "other" since the last Block hook
        self.recompute_base: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # checkpoint frame ->
        # live bytes when its backward began (by the frame object: an id could be reused by a later frame)

    def new_step(self) -> None:
        self.step = {"layers": 0, "other": 0}
        self.peak_live = self.live_bytes
        self.peak_kept = self.kept_bytes
        self.transient = 0

    def _key(self, t: torch.Tensor) -> tuple[int, int] | None:
        key = _storage_key(t)
        if key[1] == 0 or key[0] in {s.data_ptr() for s in self.param_storages}:
            return None
        return key

    def _hold(self, key: tuple[int, int], count: bool = True) -> None:
        if count:
            if self.kept.get(key, 0) == 0:
                # a storage becomes kept: count it. (Counting by address over the whole step would miss storages
                # the allocator reuses for a later micro-batch after the backward freed the earlier one.)
                self.step[self.region] += key[1]
                if self.region == "other":
                    self.fresh_other[key] = key[1]
                self.kept_bytes += key[1]
                self.peak_kept = max(self.peak_kept, self.kept_bytes)
            self.kept[key] = self.kept.get(key, 0) + 1
        if self.live.get(key, 0) == 0:
            self.live_bytes += key[1]
            self.peak_live = max(self.peak_live, self.live_bytes)
        self.live[key] = self.live.get(key, 0) + 1

    def _release(self, key: tuple[int, int], count: bool = True) -> None:
        if count and key in self.kept:
            self.kept[key] -= 1
            if self.kept[key] == 0:
                del self.kept[key]
                self.kept_bytes -= key[1]
                self.fresh_other.pop(key, None)    # freed: its address may come back as another tensor
        if key in self.live:
            self.live[key] -= 1
            if self.live[key] == 0:
                del self.live[key]
                self.live_bytes -= key[1]

    def _pack(self, t: torch.Tensor):
        key = self._key(t)
        if key is not None:
            self._hold(key)
        return (key, t)

    def _unpack(self, packed):
        key, t = packed
        if key is not None:
            self._release(key)
        return t

    @contextmanager
    def hooks(self) -> Iterator[None]:
        import torch.utils.checkpoint as ckpt

        from . import sac
        saved = self
        base_ckpt, base_recomp, base_ctx = ckpt._checkpoint_hook, ckpt._recomputation_hook, sac.context_fn

        class CheckpointHook(base_ckpt):
            """Notes the live bytes when a checkpoint's backward first unpacks (before its recompute)."""
            def __init__(self, frame) -> None:
                super().__init__(frame)
                unpack = self.unpack_hook

                def unpack_hook(holder):
                    if frame not in saved.recompute_base:
                        saved.recompute_base[frame] = saved.live_bytes
                    return unpack(holder)
                self.unpack_hook = unpack_hook

        class RecomputationHook(base_recomp):
            """Counts what the recompute stores for each holder, until the holder's handle is dropped (unpacked)."""
            def __init__(self, frame_ref, gid) -> None:
                super().__init__(frame_ref, gid)
                pack = self.pack_hook

                def pack_hook(x):
                    frame = frame_ref()
                    try:
                        idx = frame.recomp_counter[gid]
                    except AttributeError:              # torch's internals changed: no transient measured
                        saved.transient_known = False
                        return pack(x)
                    try:
                        return pack(x)
                    finally:
                        holder = frame.weak_holders[idx]() if idx < len(frame.weak_holders) else None
                        handle = holder.handles.get(gid) if holder is not None else None
                        key = saved._key(x)
                        if handle is not None and key is not None:
                            saved._hold(key, count=False)
                            weakref.finalize(handle, saved._release, key, False)
                            base = saved.recompute_base.get(frame, saved.live_bytes)
                            saved.transient = max(saved.transient, saved.live_bytes - base)
                self.pack_hook = pack_hook

        def context_fn():
            fwd, rec = base_ctx()
            cache = _WatchedCache(saved)
            fwd.storage = rec.storage = cache
            return fwd, rec

        ckpt._checkpoint_hook, ckpt._recomputation_hook, sac.context_fn = CheckpointHook, RecomputationHook, context_fn
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            ckpt._checkpoint_hook, ckpt._recomputation_hook, sac.context_fn = base_ckpt, base_recomp, base_ctx

    def watch_blocks(self, blocks: list[nn.Module]) -> None:
        def enter(_mod, args):
            # torch.utils.checkpoint saved the Block's input (its `_NoopSaveInputs`) just before calling the Block,
            # while the region was still "other": it is what the layer keeps, so it moves to "layers"
            self.region = "layers"
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            key = _storage_key(x) if x is not None else None
            if key in self.fresh_other and key in self.kept:
                self.step["other"] -= key[1]
                self.step["layers"] += key[1]
            self.fresh_other.clear()

        def leave(*_):
            # always_call: a recompute stopped early (torch's checkpoint early stop) raises out of the Block
            self.region = "other"
            self.fresh_other.clear()
        for b in blocks:
            b.register_forward_pre_hook(enter)
            b.register_forward_hook(leave, always_call=True)


class _Entries(dict):
    """One op's entries of the selective-checkpoint cache (index -> output wrapped in _VersionWrapper, or a
    marker): holds the wrapped tensors' storages while stored; released when replaced (consumed by the recompute)
    or when the cache is freed with entries never consumed (the recompute stopped early before reaching them)."""

    def __init__(self, saved: SavedTensors):
        super().__init__()
        self.saved = saved
        self.held: dict[int, list] = {}
        weakref.finalize(self, _release_all, saved, self.held)

    def __setitem__(self, idx, entry) -> None:
        super().__setitem__(idx, entry)
        for key in self.held.pop(idx, []):
            self.saved._release(key)
        keys = []
        for w in tree_flatten(entry)[0]:
            val = getattr(w, "val", None)
            if isinstance(val, torch.Tensor) and (key := self.saved._key(val)) is not None:
                self.saved._hold(key)
                keys.append(key)
        if keys:
            self.held[idx] = keys


def _release_all(saved: SavedTensors, held: dict[int, list]) -> None:
    for keys in held.values():
        for key in keys:
            saved._release(key)
    held.clear()


class _WatchedCache(dict):
    """The selective-checkpoint storage (torch's `defaultdict(dict)`: op key -> entries) with watched entries."""

    def __init__(self, saved: SavedTensors):
        super().__init__()
        self.saved = saved

    def __missing__(self, key) -> _Entries:
        d = self[key] = _Entries(self.saved)
        return d

