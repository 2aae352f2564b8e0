"""Batch-invariant mode: every reducing operation computes a row the same way whatever the batch.

On a GPU, PyTorch's matmuls (cuBLAS), convolutions (cuDNN), fused attention and reductions pick
tiles, split-K factors and reduction trees from the whole batch's shape, so a request's logits can
differ in the last bits between a batch of 16 and the request alone, and greedy decoding then
sometimes takes another token (measured on an H200: 11 of 16 rows equal in bfloat16, 15 of 16 in
float32). This mode replaces those operators, for one device type, with Triton kernels whose every
rounding decision depends only on the row itself and on shapes that do not change with the batch
(`kernels`), registered as aten kernels (`torch.library`), so the model code stays transformers'
own. Covered: `COVERED_OPS`; see docs/batch-invariance.md.

    from segmentation.model import invariant
    if invariant.env_enabled() and invariant.available("cuda"):
        invariant.enable("cuda")          # process-wide, every thread; idempotent
    ...
    invariant.disable("cuda")
    with invariant.batch_invariant("cuda"):   # or for a block only
        ...
    invariant.describe("cuda", torch.bfloat16)  # one line for the README and /models

Bit-for-bit batched ≡ solo also needs the row's own padded shapes to be the same alone and in a
batch (prompt length, cache length): a fixed-shape engine gives that; an engine that pads to the
batch's longest prompt does not.

Nothing here imports Triton until `enable` (or `kernels`) is used.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator, Mapping

import torch

from .interpreter import interpreting

ENV = "SEG_BATCH_INVARIANT"

# The aten operators replaced while the mode is on (see ops.OVERRIDES), as PyTorch names them.
COVERED_OPS = (
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::_softmax", "aten::_log_softmax", "aten::mean.dim", "aten::sum.dim_IntList",
    "aten::native_layer_norm", "aten::convolution", "aten::scaled_dot_product_attention",
)

# Device types and the dispatch keys their kernels are registered under.
_DISPATCH_KEYS = {"cuda": "CUDA", "cpu": "CPU"}
_libraries: dict[str, torch.library.Library] = {}
_lock = threading.Lock()


def _device_type(device: str | torch.device) -> str:
    kind = torch.device(device).type
    if kind not in _DISPATCH_KEYS:
        raise ValueError(f"batch-invariant mode knows device types {sorted(_DISPATCH_KEYS)}, not {kind!r}")
    return kind


def env_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether `SEG_BATCH_INVARIANT` asks for the mode (`1`/`true`/`yes`/`on`); off when unset.

    Opt-in: its cost on a GPU is unmeasured (docs/batch-invariance.md). Raises ValueError on other values.
    """
    value = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ENV} must be true or false, not {value!r}")


def available(device: str | torch.device = "cuda") -> bool:
    """Whether the kernels can run for `device`: Triton installed, and a CUDA GPU of compute capability
    8.0 or newer (bfloat16 `tl.dot`), or the CPU under Triton's interpreter (`TRITON_INTERPRET=1`)."""
    try:
        kind = _device_type(device)
    except (ValueError, RuntimeError):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if kind == "cpu":
        return interpreting()
    if interpreting() or not torch.cuda.is_available():
        return False
    index = torch.device(device).index
    return torch.cuda.get_device_capability(torch.cuda.current_device() if index is None else index) >= (8, 0)


def enable(device_type: str = "cuda") -> None:
    """Register the batch-invariant kernels for every tensor of `device_type` ("cuda", or "cpu" under
    the interpreter), process-wide and for every thread, until `disable`. Idempotent.

    Raises RuntimeError where `available(device_type)` is False. Inference only (no autograd), and
    not under `torch.compile` (compiled graphs lower matmuls themselves, past these kernels); CUDA
    graph capture works after one eager warm-up call (Triton compiles on first use).
    """
    kind = _device_type(device_type)
    with _lock:
        if kind in _libraries:
            return
        if not available(kind):
            raise RuntimeError(f"batch-invariant kernels are not available for {kind}: they need Triton and "
                               + ("TRITON_INTERPRET=1 on the CPU" if kind == "cpu" else "a CUDA GPU of sm80+"))
        from .ops import OVERRIDES

        library = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():
            # "Overriding a previously registered kernel": that is the point.
            warnings.simplefilter("ignore", UserWarning)
            for name, implementation in OVERRIDES.items():
                library.impl(name, implementation, _DISPATCH_KEYS[kind])
        _libraries[kind] = library


def disable(device_type: str | None = None) -> None:
    """Give `device_type`'s operators (None: every device type's) back to PyTorch's own kernels."""
    with _lock:
        kinds = list(_libraries) if device_type is None else [_device_type(device_type)]
        for kind in kinds:
            library = _libraries.pop(kind, None)
            if library is not None:
                library._destroy()


def is_enabled(device_type: str | torch.device = "cuda") -> bool:
    """Whether the mode is on for `device_type`."""
    return _device_type(device_type) in _libraries


def enabled_kinds() -> frozenset[str]:
    """The device types the mode is on for now (cheap: the graph engine compares it before each replay,
    since a CUDA graph holds the kernels of the mode it was captured under)."""
    return frozenset(_libraries)


@contextlib.contextmanager
def batch_invariant(device_type: str = "cuda") -> Iterator[None]:
    """The mode on for `device_type` inside the block (process-wide while it lasts); left as found after."""
    kind = _device_type(device_type)
    was_on = is_enabled(kind)
    enable(kind)
    try:
        yield
    finally:
        if not was_on:
            disable(kind)


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "its dtype"


def describe(device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> str:
    """One line saying where batched ≡ solo holds for a model served on `device` in `dtype`.

    device defaults to CUDA when present, else the CPU. Reads the current mode, so call it after
    `enable`/`disable`.
    """
    kind = _device_type(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = _dtype_name(dtype)
    if is_enabled(kind):
        return (f"batched ≡ solo bit for bit on {kind} in {name}: batch-invariant kernels on ({ENV}=1), every "
                "matmul, softmax, norm, mean and attention computes a row the same way in any batch of the "
                "fixed-shape engine")
    if kind == "cpu":
        return (f"batched ≡ solo on cpu for tokens, labels, boxes and masks as pinned by the tests (float32, tiny "
                f"fixture); log-probabilities and scores within 1e-5, not bit for bit (CPU matmuls sum a row "
                f"differently alone and in a batch); not proven in {name} for other shapes")
    return (f"batched ≡ solo not guaranteed on cuda in {name}: GPU kernels choose tiles and reduction orders by "
            f"batch shape (H200, graph engine, bfloat16: 7/16 rows equal alone, 0/16 bit for bit); set {ENV}=1 for "
            f"bit-for-bit rows (16/16 there; step cost x1.0 at 16 rows, x1.29 alone)")


__all__ = [
    "COVERED_OPS", "ENV", "available", "batch_invariant", "describe", "disable", "enable", "enabled_kinds",
    "env_enabled", "is_enabled",
]
