"""Backend selection, lazy Triton compilation and test hooks shared by every kernel.

Why lazy: ``triton.jit`` decides at *decoration* time whether a kernel is compiled or
interpreted (it reads ``TRITON_INTERPRET`` then).  Loom may be imported long before a test
sets ``TRITON_INTERPRET=1``, so kernels are kept as plain Python functions and wrapped by
:class:`LazyKernel` at launch time, once per mode.  Kernels therefore never call other
``@triton.jit`` helpers (those would be bound at import time); loop bodies are inlined.
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch

try:  # Triton is optional: without it every op uses its pure-torch twin.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install raising at import
    triton = None  # type: ignore[assignment]
    tl = SimpleNamespace(constexpr=None)  # kernel annotations still evaluate
    HAS_TRITON = False

_BACKENDS = ("auto", "torch", "triton")
_backend: str | None = None  # set_backend() override; None -> env LOOM_KERNELS -> "auto"

#: Test hook: when True every kernel output buffer is filled with NaN instead of being
#: left uninitialised, so an element the kernel forgets to write fails the comparison.
POISON_OUTPUTS: bool = os.environ.get("LOOM_KERNELS_POISON", "0") == "1"

#: Number of Triton launches per kernel name; tests assert on it to prove the Triton
#: path (not the twin) ran.
LAUNCHES: Counter[str] = Counter()


def set_backend(name: str | None) -> None:
    """Force ``"torch"`` (twins), ``"triton"`` (error if impossible) or ``"auto"``.

    ``None`` clears the override so the ``LOOM_KERNELS`` environment variable applies.
    """
    global _backend
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    name = _backend or os.environ.get("LOOM_KERNELS", "auto").strip().lower() or "auto"
    if name not in _BACKENDS:
        raise ValueError(f"LOOM_KERNELS must be one of {_BACKENDS}, got {name!r}")
    return name


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (read at every call)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Dispatch rule: CUDA -> Triton; CPU -> twin unless TRITON_INTERPRET=1."""
    backend = get_backend()
    if backend == "torch":
        return False
    runnable = HAS_TRITON and (all(t.is_cuda for t in tensors) or interpret_mode())
    if backend == "triton" and not runnable:
        why = "triton is not importable" if not HAS_TRITON else (
            "tensors are not on CUDA and TRITON_INTERPRET!=1")
        raise RuntimeError(f"loom.kernels backend 'triton' forced but {why}")
    return runnable


def alloc(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer (NaN-filled under the POISON_OUTPUTS test hook)."""
    if POISON_OUTPUTS:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def alloc_like(t: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uninitialised buffer with ``t``'s shape *and memory layout* (strides, for a dense ``t``).

    Why: q arrives as a permuted view of a sequence-first (s, b, heads·d) projection; an output laid out the same
    way permutes back into the next projection's input as a view, not a copy, so one tensor serves both as the
    kernel's saved output and as the next linear's saved input (saved once, as the memory model counts it).
    """
    if POISON_OUTPUTS:
        return torch.full_like(t, float("nan"), dtype=dtype)
    return torch.empty_like(t, dtype=dtype)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


class LazyKernel:
    """A Triton kernel compiled on first launch in the current mode.

    ``configs`` (GPU only) are autotuned over ``key``; in the interpreter, or when no
    configs are given, ``fixed`` meta-parameters are passed explicitly instead, keeping the
    interpreter fast (small blocks, no autotune sweep).
    """

    def __init__(self, fn: Callable[..., Any], *, configs: list[Any] | None = None,
                 key: Sequence[str] = (), fixed: dict[str, Any] | None = None,
                 interpret: dict[str, Any] | None = None) -> None:
        self.fn = fn
        self.configs = configs
        self.key = list(key)
        self.fixed = dict(fixed or {})
        self.interpret = dict(interpret if interpret is not None else self.fixed)
        self._compiled: dict[bool, Any] = {}

    def _get(self, interp: bool) -> Any:
        k = self._compiled.get(interp)
        if k is None:
            k = triton.jit(self.fn)
            if not interp and self.configs:
                k = triton.autotune(configs=self.configs, key=self.key)(k)
            self._compiled[interp] = k
        return k

    def meta(self) -> dict[str, Any]:
        """Meta-parameters the caller must pass (empty when autotuned)."""
        interp = interpret_mode()
        if interp:
            return {k: v for k, v in self.interpret.items() if k not in ("num_warps", "num_stages")}
        return {} if self.configs else dict(self.fixed)

    def __call__(self, grid: Any, *args: Any, **kwargs: Any) -> None:
        interp = interpret_mode()
        LAUNCHES[self.fn.__name__] += 1
        with _stdlib_interpretable() if interp else contextlib.nullcontext():
            self._get(interp)[grid](*args, **self.meta(), **kwargs)


_INTERPRETED: dict[Any, Any] = {}


@contextlib.contextmanager
def _stdlib_interpretable():
    """Let interpreted kernels call triton's own ``@jit`` library functions.

    ``tl.zeros``, ``tl.max``, ``tl.sum``... are decorated when triton is *imported*; if that
    happened before TRITON_INTERPRET=1 was set they are compiled-mode ``JITFunction`` objects,
    which refuse to be called from Python.  For the duration of one interpreted launch we
    route such calls through the interpreter, then restore the class untouched.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    had_own = "__call__" in JITFunction.__dict__
    original = JITFunction.__dict__.get("__call__")

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        fn = _INTERPRETED.get(self.fn)
        if fn is None:
            fn = _INTERPRETED[self.fn] = InterpretedFunction(self.fn)
        return fn(*args, **kwargs)

    JITFunction.__call__ = call  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had_own:
            JITFunction.__call__ = original  # type: ignore[method-assign]
        else:
            del JITFunction.__call__


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact IEEE dots (tests, fp32 training); half types ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"
