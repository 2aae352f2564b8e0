"""The VQ-VAE mask decoder of PaliGemma (big_vision's `vae-oid.npz`) in pure JAX.

16 codes (0..127) per object → their 512-d embeddings on a 4×4 grid → 1×1 conv + relu → two residual
blocks → four stride-2 transposed convs (each + relu) → 1×1 conv: a 64×64 float map, roughly in
-1..1, positive inside the object. The checkpoint is a PyTorch state dict flattened to npz, so
weights arrive in PyTorch layouts and are converted once at load.

Shapes are padded to a few bucket sizes so that after `warmup()` no call compiles again, and the
decoder runs on the CPU: it is tiny, and on a GPU host JAX would otherwise preallocate 75 % of the
GPU's memory and starve torch.
"""

from __future__ import annotations

import os

# Before JAX is imported: never grab GPU memory, and use the CPU unless the operator chose otherwise.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from .checkpoints import EMBEDDING_DIM, NUM_CODES, RESBLOCKS, UPSAMPLES, load_vae_checkpoint  # noqa: E402
from .checkpoints import vae_shapes as expected_shapes  # noqa: E402, F401  (re-exported)

CODES_PER_MASK = 16
MASK_SIZE = 64
BUCKETS = (1, 4, 16, 64)



def run_in_buckets(fn, inputs: np.ndarray, out_shape: tuple[int, ...], out_dtype) -> np.ndarray:
    """`fn` over `inputs` `[N, ...]` in chunks of at most `BUCKETS[-1]` rows, each zero-padded to the
    next bucket size so a jitted `fn` compiles once per bucket; `[N, *out_shape]` of `out_dtype`."""
    out = np.empty((inputs.shape[0], *out_shape), out_dtype)
    for start in range(0, inputs.shape[0], BUCKETS[-1]):
        chunk = inputs[start:start + BUCKETS[-1]]
        bucket = next(b for b in BUCKETS if b >= len(chunk))
        padded = np.zeros((bucket, *inputs.shape[1:]), inputs.dtype)
        padded[: len(chunk)] = chunk
        out[start:start + len(chunk)] = np.asarray(fn(padded))[: len(chunk)]
    return out


def _conv_kernel(weight: np.ndarray) -> np.ndarray:
    """Conv2d [out, in, kh, kw] → HWIO."""
    return np.transpose(weight, (2, 3, 1, 0))


def _transposed_conv_kernel(weight: np.ndarray) -> np.ndarray:
    """ConvTranspose2d [in, out, kh, kw] → the HWIO kernel of the equivalent dilated convolution.

    A transposed convolution is a convolution of the input dilated by the stride, with the kernel
    flipped in space and its in/out axes swapped.
    """
    return np.transpose(weight[:, :, ::-1, ::-1], (2, 3, 0, 1))


def _conv(x, kernel, bias, padding: int):
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + bias


def _transposed_conv(x, kernel, bias):
    # PyTorch ConvTranspose2d(kernel 4, stride 2, padding 1) == dilate input by 2, pad k-1-p = 2.
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((2, 2), (2, 2)), lhs_dilation=(2, 2),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + bias


class VaeHalf:
    """One half of the VQ-VAE (decoder or encoder): its weights from a vae-oid.npz, converted once and
    kept on the CPU, and its jitted forward pass run in bucket-padded batches.

    Subclasses define `_convert(raw) -> params`, `_forward(params, batch)` and, if they read more than
    the decoder's tensors, `_check(arrays, path)`.
    """

    def __init__(self, params: dict[str, np.ndarray], device=None):
        self.device = device or jax.devices("cpu")[0]
        self.params = jax.device_put(self._convert(params), self.device)
        self.trace_count = 0  # bumped only while tracing: a steady value means no recompilation
        self._jitted = jax.jit(self._traced)

    @classmethod
    def from_npz(cls, path: str | Path, device=None):
        """Load big_vision's `vae-oid.npz` (or a file with its layout); CheckpointError (a ValueError)
        names the file and what is wrong."""
        arrays = load_vae_checkpoint(path)
        cls._check(arrays, path)
        return cls(arrays, device=device)

    @staticmethod
    def _check(arrays: dict[str, np.ndarray], path: str | Path) -> None:
        """Checks beyond `load_vae_checkpoint`'s (the decoder needs none)."""

    def _traced(self, params, batch):
        self.trace_count += 1
        return self._forward(params, batch)

    def _run(self, batch: np.ndarray, out_shape: tuple[int, ...], out_dtype) -> np.ndarray:
        return run_in_buckets(lambda b: self._jitted(self.params, jax.device_put(b, self.device)),
                              batch, out_shape, out_dtype)


class MaskDecoder(VaeHalf):
    """Decodes `[N, 16]` mask codes into `[N, 64, 64]` float32 maps (positive = object)."""

    @staticmethod
    def _convert(raw: dict[str, np.ndarray]) -> dict:
        f32 = {k: np.asarray(v, dtype=np.float32) for k, v in raw.items()}
        return {
            "embedding": f32["_vq_vae._embedding"],
            "in": (_conv_kernel(f32["decoder.0.weight"]), f32["decoder.0.bias"]),
            "res": [
                [(_conv_kernel(f32[f"{b}.{i}.weight"]), f32[f"{b}.{i}.bias"]) for i in ("0", "2", "4")]
                for b in RESBLOCKS
            ],
            "up": [(_transposed_conv_kernel(f32[f"{n}.weight"]), f32[f"{n}.bias"]) for n, _, _ in UPSAMPLES],
            "out": (_conv_kernel(f32["decoder.12.weight"]), f32["decoder.12.bias"]),
        }

    def _forward(self, params, codes):
        x = jnp.take(params["embedding"], codes.reshape(-1), axis=0)
        x = x.reshape(codes.shape[0], 4, 4, EMBEDDING_DIM)  # row-major 4x4 grid
        x = jax.nn.relu(_conv(x, *params["in"], padding=0))
        for (k0, b0), (k1, b1), (k2, b2) in params["res"]:
            h = jax.nn.relu(_conv(x, k0, b0, padding=1))
            h = jax.nn.relu(_conv(h, k1, b1, padding=1))
            x = x + _conv(h, k2, b2, padding=0)
        for kernel, bias in params["up"]:
            x = jax.nn.relu(_transposed_conv(x, kernel, bias))
        x = _conv(x, *params["out"], padding=0)
        return x[..., 0]

    def decode(self, codes) -> np.ndarray:
        """`[N, 16]` codes in 0..127 → `[N, 64, 64]` float32, in chunks padded to bucket sizes."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != CODES_PER_MASK:
            raise ValueError(f"codes must have shape [N, {CODES_PER_MASK}], got {codes.shape}")
        # The dtype first: min()/max() of strings or objects would raise TypeError, not ValueError.
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be integers in 0..{NUM_CODES - 1}, got dtype {codes.dtype}")
        if codes.size and (codes.min() < 0 or codes.max() >= NUM_CODES):
            raise ValueError(f"codes must be integers in 0..{NUM_CODES - 1}, got {codes.min()}..{codes.max()}")
        return self._run(codes.astype(np.int32), (MASK_SIZE, MASK_SIZE), np.float32)

    def warmup(self) -> None:
        """Compile every bucket now, so no request pays for compilation."""
        for bucket in BUCKETS:
            self.decode(np.zeros((bucket, CODES_PER_MASK), np.int32))
