"""Text-prompted image segmentation with PaliGemma 2: parsing, mask decoding, encodings, engine.

`from segmentation import Segmenter` loads the model side lazily, so the light modules (tokens,
prompts, masks, encoding, images) import without torch or JAX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .results import DetectedObject, SegmentationResult

if TYPE_CHECKING:
    from .predictions import Prediction
    from .segmenter import Segmenter

__all__ = ["DetectedObject", "Prediction", "SegmentationResult", "Segmenter"]


def __getattr__(name: str):
    if name == "Segmenter":
        from .segmenter import Segmenter

        return Segmenter
    if name == "Prediction":
        from .predictions import Prediction

        return Prediction
    raise AttributeError(f"module 'segmentation' has no attribute {name!r}")
