"""Shared by the kernel test modules: run Loom's Triton kernels in the Triton interpreter (CPU, fp32) with
NaN-poisoned outputs, for one module at a time. Set per module, not process-wide, so that the executor's CPU
tests keep using the torch twins (see tests/test_kernels_flash_attention.py)."""
from __future__ import annotations

import pytest

from loom.kernels import _dispatch


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.delenv("LOOM_KERNELS", raising=False)
        mp.setattr(_dispatch, "_backend", None)
        mp.setattr(_dispatch, "POISON_OUTPUTS", True)
        yield
