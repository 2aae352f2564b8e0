"""Checks of model files before anything loads them, so a bad file stops the server with its name.

A corrupt checkpoint found inside a server worker only makes the worker restart forever; checked when
the service is imported, it stops `bentoml serve` at once with a message naming the file and the cause.
The checks read headers and the small decoder checkpoint only, never the model weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NUM_CODES = 128
EMBEDDING_DIM = 512
RESBLOCKS = ("decoder.2.net", "decoder.3.net")
UPSAMPLES = (("decoder.4", 128, 128), ("decoder.6", 128, 64), ("decoder.8", 64, 32), ("decoder.10", 32, 16))


class CheckpointError(ValueError):
    """A model file that is missing, unreadable or of the wrong layout."""


def vae_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor the mask decoder reads from vae-oid.npz, with its PyTorch shape."""
    shapes = {
        "_vq_vae._embedding": (NUM_CODES, EMBEDDING_DIM),
        "decoder.0.weight": (128, EMBEDDING_DIM, 1, 1),
        "decoder.0.bias": (128,),
        "decoder.12.weight": (1, 16, 1, 1),
        "decoder.12.bias": (1,),
    }
    for block in RESBLOCKS:
        for layer, kernel in (("0", 3), ("2", 3), ("4", 1)):
            shapes[f"{block}.{layer}.weight"] = (128, 128, kernel, kernel)
            shapes[f"{block}.{layer}.bias"] = (128,)
    for name, cin, cout in UPSAMPLES:
        shapes[f"{name}.weight"] = (cin, cout, 4, 4)  # ConvTranspose2d: [in, out, kh, kw]
        shapes[f"{name}.bias"] = (cout,)
    return shapes


def load_vae_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """The decoder's tensors from a vae-oid.npz; CheckpointError names the file, the key and the cause."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: mask decoder checkpoint not found")
    try:
        # Open the file ourselves: np.load leaves its own handle open when the data is corrupt.
        with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as exc:  # zipfile, pickle and format errors alike
        raise CheckpointError(f"{path}: not a readable npz checkpoint ({type(exc).__name__}: {exc})") from exc
    for key, shape in vae_shapes().items():
        if key not in arrays:
            raise CheckpointError(f"{path}: missing tensor {key!r} (expected shape {shape})")
        if tuple(arrays[key].shape) != shape:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(arrays[key].shape)}, expected {shape}")
    return arrays


def config_field(file: Path, key: str, missing: str, error: type[CheckpointError] = CheckpointError):
    """`key` of the JSON object in `file`; `error(missing)` when there is no file, naming it when unreadable."""
    if not file.is_file():
        raise error(missing)
    try:
        return json.loads(file.read_text()).get(key)
    except (OSError, ValueError) as exc:
        raise error(f"{file}: unreadable ({exc})") from exc


def check_paligemma_dir(path: str | Path) -> None:
    """A `save_pretrained` PaliGemma directory: config, tokenizer and readable safetensors headers."""
    from safetensors import safe_open

    path = Path(path)
    config = path / "config.json"
    kind = config_field(config, "model_type", f"{path}: no PaliGemma model here (config.json not found)")
    if kind != "paligemma":
        raise CheckpointError(f"{config}: model_type is {kind!r}, expected 'paligemma'")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise CheckpointError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{path}: no *.safetensors weights")
    for file in weights:
        try:
            with safe_open(str(file), framework="numpy") as f:
                f.keys()
        except Exception as exc:
            raise CheckpointError(f"{file}: unreadable weights ({type(exc).__name__}: {exc})") from exc
