"""Training data: real text tokenized to memory-mapped shards, read deterministically per DP rank.

Built-in sources are made offline from this machine's Python standard library: "stdlib_code" (every .py file
under sysconfig's stdlib path, sorted, excluding site-packages) and "stdlib_docs" (the reference documentation
text in pydoc_data.topics). The tokenizer is byte-level: ids 0-255 are bytes, 256 is EOS (an honest simple choice
without a trained BPE). Documents are joined with EOS into one token stream and cut into windows of seq_len + 1
tokens (inputs and next-token targets), each window starting seq_len after the previous (GPT-2/nanoGPT packing).

Shard directory format (also for user data): meta.json {"dtype": "uint16"|"uint32", "vocab_size": N,
"eos_id": E} plus one or more *.bin files of little-endian token ids, concatenated in sorted file-name order.

Order: global sequence j of the run draws its source by a hash of (seed, j) against the mixture weights, and
takes window perm_e[j mod N] of that source, with perm_e a permutation seeded by (seed, epoch e = j div N).
So the data is a pure function of (seed, j): the position to checkpoint is just the number of sequences consumed.
"""
from __future__ import annotations

import fcntl
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loom.spec.run import BUILTIN_SOURCES, DataSpec

EOS = 256
BYTE_VOCAB = 257


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.uint16)


def decode(ids) -> str:
    return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def _documents(source: str) -> list[str]:
    if source == "stdlib_code":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]
    if source == "stdlib_docs":
        from pydoc_data.topics import topics
        return [topics[k] for k in sorted(topics)]
    raise ValueError(f"unknown built-in source {source!r}; use one of {BUILTIN_SOURCES}")


def build_builtin(source: str, cache_dir: str | Path) -> Path:
    """Tokenize a built-in source once into cache_dir/source (a shard directory); safe across processes."""
    out = Path(cache_dir) / source
    if (out / "meta.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                # one rank builds; the others wait, then find it
        if not (out / "meta.json").exists():
            parts = []
            for doc in _documents(source):
                parts += [encode(doc), np.array([EOS], dtype=np.uint16)]
            tokens = np.concatenate(parts)
            tmp = out / "tokens.bin.tmp"
            tokens.tofile(tmp)
            os.replace(tmp, out / "tokens.bin")
            meta = {"dtype": "uint16", "vocab_size": BYTE_VOCAB, "eos_id": EOS, "tokenizer": "byte",
                    "source": source, "tokens": int(tokens.size)}
            (out / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
            os.replace(out / "meta.json.tmp", out / "meta.json")
    return out


@dataclass
class Shards:
    """One source: its token stream as memory maps."""
    path: Path
    maps: list[np.memmap]
    vocab_size: int

    @classmethod
    def open(cls, path: str | Path) -> "Shards":
        path = Path(path).expanduser()
        meta = json.loads((path / "meta.json").read_text())
        dtype = np.dtype(meta.get("dtype", "uint16")).newbyteorder("<")
        maps = [np.memmap(f, dtype=dtype, mode="r") for f in sorted(path.glob("*.bin"))]
        if not maps:
            raise FileNotFoundError(f"{path} has meta.json but no *.bin token files")
        return cls(path, maps, int(meta["vocab_size"]))

    def __post_init__(self):
        self.sizes = np.array([m.size for m in self.maps], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])

    @property
    def tokens(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        out, pos = [], start
        while n > 0:
            i = int(np.searchsorted(self.starts, pos, side="right") - 1)
            off = pos - int(self.starts[i])
            take = min(n, int(self.sizes[i]) - off)
            out.append(np.asarray(self.maps[i][off:off + take], dtype=np.int64))
            pos, n = pos + take, n - take
        return np.concatenate(out)


class TokenData:
    """Sequences of one run: sequence(j) -> int64 tokens (seq_len + 1,), a pure function of (seed, j)."""

    def __init__(self, data: DataSpec | None, seq_len: int, seed: int, model_vocab: int):
        data = data or DataSpec()
        self.seq_len, self.seed = seq_len, seed
        self.sources: dict[str, Shards] = {}
        for mix in (data.mixture, data.decay_mixture or {}):
            for src in mix:
                if src not in self.sources:
                    path = build_builtin(src, data.cache_dir) if src in BUILTIN_SOURCES else src
                    self.sources[src] = Shards.open(path)
                    if self.sources[src].vocab_size > model_vocab:
                        raise ValueError(f"model.vocab = {model_vocab} is smaller than source {src!r}'s "
                                         f"vocab_size {self.sources[src].vocab_size}; raise model.vocab")
                    if self.sources[src].tokens < seq_len + 1:
                        raise ValueError(f"source {src!r} has fewer than seq_len + 1 tokens")
        self.mixtures = [self._norm(data.mixture), self._norm(data.decay_mixture) if data.decay_mixture else None]
        self._perm: dict[tuple[str, int], np.ndarray] = {}

    @staticmethod
    def _norm(mix: dict[str, float]) -> list[tuple[str, float]]:
        total = sum(mix.values())
        acc, out = 0.0, []
        for k in sorted(mix):
            acc += mix[k] / total
            out.append((k, acc))
        return out

    def windows(self, src: str) -> int:
        return (self.sources[src].tokens - 1) // self.seq_len

    def _window(self, src: str, j: int) -> int:
        n = self.windows(src)
        epoch = j // n
        key = (src, epoch)
        if key not in self._perm:
            if len(self._perm) > 8:
                self._perm.clear()
            self._perm[key] = np.random.default_rng([self.seed, epoch, len(src)]).permutation(n)
        return int(self._perm[key][j % n])

    def source_of(self, j: int, decay: bool) -> str:
        mix = self.mixtures[1] if decay and self.mixtures[1] else self.mixtures[0]
        if len(mix) == 1:
            return mix[0][0]
        u = np.random.default_rng([self.seed, 7, j]).random()
        return next((k for k, c in mix if u < c), mix[-1][0])

    def sequence(self, j: int, decay: bool = False) -> np.ndarray:
        src = self.source_of(j, decay)
        w = self._window(src, j)
        return self.sources[src].read(w * self.seq_len, self.seq_len + 1)


@dataclass
class Batches:
    """This DP rank's micro-batches of each step: the global batch of step t is sequences [t·G, (t+1)·G);
    DP rank r takes the r-th contiguous G/dp of them, cut into micro-batches."""
    data: TokenData
    global_batch: int
    micro_batch: int
    dp_size: int
    dp_rank: int
    device: torch.device

    def micro_batches(self, consumed: int, decay: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        per = self.global_batch // self.dp_size
        base = consumed + self.dp_rank * per
        out = []
        for m in range(per // self.micro_batch):
            seqs = np.stack([self.data.sequence(base + m * self.micro_batch + i, decay)
                             for i in range(self.micro_batch)])
            t = torch.from_numpy(seqs).to(self.device)
            out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
        return out
