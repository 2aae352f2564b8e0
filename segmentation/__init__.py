"""Text-prompted image segmentation with PaliGemma 2: parsing, mask decoding, encodings, engine.

`from segmentation import Segmenter` loads the model side lazily, so the light modules (tokens,
prompts, masks, encoding, images) import without torch or JAX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .results import DetectedObject, SegmentationResult

if TYPE_CHECKING:
    from .segmenter import Prediction, Segmenter

__all__ = ["DetectedObject", "Prediction", "SegmentationResult", "Segmenter"]


def __getattr__(name: str):
    if name in ("Segmenter", "Prediction"):
        from . import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'segmentation' has no attribute {name!r}")
