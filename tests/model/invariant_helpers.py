"""Shared by the batch-invariance tests: Triton's CPU interpreter switched on before the kernels load.

`TRITON_INTERPRET=1` must be set before `@triton.jit` runs (it decides then whether a kernel is
compiled or interpreted), so this sets it and reloads the kernel module if something imported it
earlier without the interpreter.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="the batch-invariant kernels need Triton (requirements-dev.txt)")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402


def load_kernels():
    """segmentation.model.invariant.kernels with interpreted kernels."""
    name = "segmentation.model.invariant.kernels"
    module = importlib.import_module(name)
    if not isinstance(module._matmul_kernel, InterpretedFunction):
        module = importlib.reload(sys.modules[name])
    assert isinstance(module._matmul_kernel, InterpretedFunction)
    return module
