"""The VQ-VAE mask encoder of PaliGemma (the `encoder.*` tensors of `vae-oid.npz`) in pure JAX.

The mirror of `segmentation.model.vae`: a 64×64 mask in [0, 1] → mapped to [-1, 1] → four stride-2
convolutions, each + relu → two residual blocks (conv, relu, conv, relu, conv, plus skip) → a 1×1
convolution to the 512-d codebook space on a 4×4 grid → per cell, the nearest codebook entry by
squared distance: 16 codes (0..127), row-major, as big_vision's `encode_to_codebook_indices`.

Every convolution pads like TensorFlow's `SAME` (big_vision runs `tf.nn.conv2d(..., padding="SAME")`),
which is asymmetric for odd kernels with stride 2 (one more row/column after than before), unlike
PyTorch's symmetric `padding=1`. Kernel sizes and channel counts are read from the checkpoint.
Batches are padded to the decoder's bucket sizes, so after `warmup()` no call compiles again.
"""

from __future__ import annotations

import os

# Before JAX is imported (as in .vae): never grab GPU memory, and use the CPU unless chosen otherwise.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from .checkpoints import EMBEDDING_DIM, CheckpointError  # noqa: E402
from .vae import BUCKETS, CODES_PER_MASK, MASK_SIZE, VaeHalf, _conv_kernel  # noqa: E402

__all__ = ["ENCODER_DOWNSAMPLES", "ENCODER_RESBLOCKS", "MaskEncoder", "check_encoder_layout"]

# big_vision's layout: NUM_DOWNSAMPLE_LAYERS = 4 convs at encoder.{0,2,4,6} (relus between them are
# the odd indices of the PyTorch Sequential), NUM_RES_BLOCKS = 2 at encoder.{8,9}.net, then encoder.10.
ENCODER_DOWNSAMPLES = ("encoder.0", "encoder.2", "encoder.4", "encoder.6")
ENCODER_RESBLOCKS = ("encoder.8.net", "encoder.9.net")
ENCODER_OUT = "encoder.10"


def _encoder_layers() -> list[str]:
    """Every conv layer of the encoder, in the order data flows through them."""
    res = [f"{block}.{i}" for block in ENCODER_RESBLOCKS for i in ("0", "2", "4")]
    return [*ENCODER_DOWNSAMPLES, *res, ENCODER_OUT]


def check_encoder_layout(arrays: dict[str, np.ndarray], source: str | Path) -> None:
    """Raise CheckpointError naming `source` and the tensor unless the encoder tensors form a chain of
    Conv2d weights `[out, in, kh, kw]` with biases `[out]` from 1 channel to the codebook's 512, whose
    residual blocks end with as many channels as they start with (for the skip connection)."""
    channels = 1
    for layer in _encoder_layers():
        weight_key, bias_key = f"{layer}.weight", f"{layer}.bias"
        for key in (weight_key, bias_key):
            if key not in arrays:
                raise CheckpointError(f"{source}: missing tensor {key!r}: no mask encoder in this checkpoint")
        weight, bias = arrays[weight_key], arrays[bias_key]
        if weight.ndim != 4 or weight.shape[1] != channels:
            raise CheckpointError(
                f"{source}: tensor {weight_key!r} has shape {tuple(weight.shape)}, expected a Conv2d weight "
                f"[out, {channels}, kh, kw]")
        if tuple(bias.shape) != (weight.shape[0],):
            raise CheckpointError(f"{source}: tensor {bias_key!r} has shape {tuple(bias.shape)}, "
                                  f"expected ({weight.shape[0]},)")
        if layer.endswith(".net.0"):
            block_channels = channels
        if layer.endswith(".net.4") and weight.shape[0] != block_channels:
            raise CheckpointError(f"{source}: tensor {weight_key!r} gives {weight.shape[0]} channels; its residual "
                                  f"block starts with {block_channels}")
        channels = weight.shape[0]
    if channels != EMBEDDING_DIM:
        raise CheckpointError(f"{source}: {ENCODER_OUT}.weight gives {channels} channels, the codebook has "
                              f"{EMBEDDING_DIM}")


def _conv_same(x, kernel, bias, stride: int):
    """NHWC convolution with TensorFlow's SAME padding (XLA's "SAME" is the same rule)."""
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + bias


class MaskEncoder(VaeHalf):
    """Encodes `[N, 64, 64]` masks in [0, 1] into `[N, 16]` int32 codes (0..127)."""

    _check = staticmethod(check_encoder_layout)

    @staticmethod
    def _convert(raw: dict[str, np.ndarray]) -> dict:
        def layer(name: str):
            return (_conv_kernel(np.asarray(raw[f"{name}.weight"], np.float32)),
                    np.asarray(raw[f"{name}.bias"], np.float32))

        return {
            "down": [layer(name) for name in ENCODER_DOWNSAMPLES],
            "res": [[layer(f"{block}.{i}") for i in ("0", "2", "4")] for block in ENCODER_RESBLOCKS],
            "out": layer(ENCODER_OUT),
            "embedding": np.asarray(raw["_vq_vae._embedding"], np.float32),
        }

    def _forward(self, params, masks):
        x = (2.0 * (masks - 0.5))[..., None]  # [0, 1] → [-1, 1], NHWC with one channel
        for kernel, bias in params["down"]:
            x = jax.nn.relu(_conv_same(x, kernel, bias, stride=2))
        for (k0, b0), (k1, b1), (k2, b2) in params["res"]:
            h = jax.nn.relu(_conv_same(x, k0, b0, stride=1))
            h = jax.nn.relu(_conv_same(h, k1, b1, stride=1))
            x = x + _conv_same(h, k2, b2, stride=1)
        x = _conv_same(x, *params["out"], stride=1)
        flat = x.reshape(x.shape[0], -1, EMBEDDING_DIM)  # row-major cells, as big_vision's reshape
        embedding = params["embedding"]
        distances = (
            jnp.sum(flat**2, axis=-1, keepdims=True)
            + jnp.sum(embedding**2, axis=-1)
            - 2.0 * jnp.einsum("ncd,kd->nck", flat, embedding)
        )
        return jnp.argmin(distances, axis=-1).astype(jnp.int32)

    def encode(self, masks) -> np.ndarray:
        """`[N, 64, 64]` float in [0, 1] (or bool) → `[N, 16]` int32 codes in 0..127.

        ValueError names the problem for another shape, a non-numeric dtype, or values outside [0, 1].
        """
        masks = np.asarray(masks)
        if masks.ndim != 3 or masks.shape[1:] != (MASK_SIZE, MASK_SIZE):
            raise ValueError(f"masks must have shape [N, {MASK_SIZE}, {MASK_SIZE}], got {masks.shape}")
        if not (np.issubdtype(masks.dtype, np.floating) or np.issubdtype(masks.dtype, np.integer)
                or masks.dtype == bool):
            raise ValueError(f"masks must be numbers in [0, 1], got dtype {masks.dtype}")
        masks = masks.astype(np.float32)
        if masks.size and not (np.isfinite(masks).all() and masks.min() >= 0.0 and masks.max() <= 1.0):
            bad = masks[~((masks >= 0.0) & (masks <= 1.0))]  # NaN fails both comparisons
            raise ValueError(f"masks must be in [0, 1], got values such as {bad[0]}")
        return self._run(masks, (CODES_PER_MASK,), np.int32)

    def warmup(self) -> None:
        """Compile every bucket now, so no request pays for compilation."""
        for bucket in BUCKETS:
            self.encode(np.zeros((bucket, MASK_SIZE, MASK_SIZE), np.float32))
