"""Running the kernels on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`), for tests and smoke runs.

The interpreter executes `tl.dot` as one `numpy.matmul` of the two blocks. NumPy's BLAS (OpenBLAS
here) computes the rows of a block with different micro-kernels depending on where the row sits in
the block (measured: in a 64-row float32 block, rows 0..~23 and rows past them round differently),
so under the stock interpreter a row's bits depend on its position in the tile, which a GPU's
tensor cores do not do: there every element of a tile is accumulated by the same instruction
sequence. `position_invariant_dot()` swaps the interpreter's dot for one that adds the K products of
every element in the same order (k = 0, 1, ...), which models that hardware property, so a CPU test
checks what the kernels themselves decide (tiles, masks, K order, epilogue) rather than OpenBLAS's.

Set `TRITON_INTERPRET=1` before `segmentation.model.invariant.kernels` is first imported.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _ordered_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    """`d + a @ b` with each element's products added to `d` one k at a time, in order.

    a [M, K], b [K, N], d [M, N] (TensorHandles); products are formed in d's dtype (float32 for the
    kernels here: float16 inputs multiply exactly in float32).
    """
    from triton.runtime.interpreter import TensorHandle

    acc_type = d.data.dtype
    # [1 + K, M, N]: d, then the K product planes; a reduction over the outermost axis adds the
    # planes in order for every element alike.
    products = a.data.astype(acc_type).T[:, :, None] * b.data.astype(acc_type)[:, None, :]
    out = np.add.reduce(np.concatenate([d.data[None], products]), axis=0)
    return TensorHandle(out.astype(acc_type), d.dtype.scalar)


@contextlib.contextmanager
def position_invariant_dot():
    """Inside the block, the interpreter's `tl.dot` accumulates every element in the same order."""
    from triton.runtime.interpreter import InterpreterBuilder

    previous = InterpreterBuilder.create_dot
    InterpreterBuilder.create_dot = _ordered_dot
    try:
        yield
    finally:
        InterpreterBuilder.create_dot = previous


__all__ = ["interpreting", "position_invariant_dot"]
