#!/usr/bin/env python
"""Write a random checkpoint in the exact key layout and shapes of big_vision's vae-oid.npz.

    python scripts/make_vae_fixture.py OUT.npz

The weights are random (He-scaled, so decoded maps have both signs and pasted masks are neither
empty nor full; the last layer is scaled up so the maps span roughly -1..1 like the real decoder's);
the `encoder.*` tensors are included as in the real file (the decoder ignores them; the mask
encoder reads them). `scripts/train_vae_fixture.py` trains the same layout on synthetic shapes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The real file's mask encoder (unused by the decoder; read by segmentation.model.encoder): four
# stride-2 convs from the 1-channel mask up to 128 channels (64 -> 4 pixels), two residual blocks,
# and a 1x1 conv to the 512-d codebook space.
ENCODER_SHAPES: dict[str, tuple[int, ...]] = {}
for _index, (_cout, _cin) in enumerate(((16, 1), (32, 16), (64, 32), (128, 64))):
    ENCODER_SHAPES[f"encoder.{2 * _index}.weight"] = (_cout, _cin, 4, 4)
    ENCODER_SHAPES[f"encoder.{2 * _index}.bias"] = (_cout,)
for _block in ("encoder.8.net", "encoder.9.net"):
    for _layer, _kernel in (("0", 3), ("2", 3), ("4", 1)):
        ENCODER_SHAPES[f"{_block}.{_layer}.weight"] = (128, 128, _kernel, _kernel)
        ENCODER_SHAPES[f"{_block}.{_layer}.bias"] = (128,)
ENCODER_SHAPES["encoder.10.weight"] = (512, 128, 1, 1)
ENCODER_SHAPES["encoder.10.bias"] = (512,)
# He-scaled layers leave the last 1x1 conv's output at about +-0.3; this gain (on weight and bias
# alike, so signs and hard masks do not change) spreads it over roughly -1..1 for soft masks.
_OUTPUT_GAIN = 3.0


def make_vae_checkpoint(seed: int = 0) -> dict[str, np.ndarray]:
    # checkpoints, not vae: building a fixture needs no JAX.
    from segmentation.model.checkpoints import UPSAMPLES, vae_shapes

    transposed = {f"{name}.weight" for name, _, _ in UPSAMPLES}
    rng = np.random.default_rng(seed)
    weights = {}
    for key, shape in {**vae_shapes(), **ENCODER_SHAPES}.items():
        if key == "_vq_vae._embedding":
            weights[key] = rng.normal(0.0, 1.0, shape).astype(np.float32)
        elif key.endswith(".bias"):
            weights[key] = rng.normal(0.0, 0.05, shape).astype(np.float32)
        else:
            # PyTorch layouts: fan-in is in-channels x kernel area (axis 1 for Conv2d, axis 0 for
            # ConvTranspose2d, whose weights are [in, out, kh, kw]).
            fan_in = (shape[0] if key in transposed else shape[1]) * shape[2] * shape[3]
            weights[key] = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
    weights["decoder.12.weight"] *= _OUTPUT_GAIN
    weights["decoder.12.bias"] *= _OUTPUT_GAIN
    return weights


def write_vae_npz(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **make_vae_checkpoint(seed))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write_vae_npz(sys.argv[1]))
