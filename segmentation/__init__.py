"""Text-prompted image segmentation with PaliGemma 2.

The package has three parts:

- `segmentation.model`: the model library (prompts, grammar-constrained generation, token parsing,
  the JAX mask decoder, mask pasting, result types and encodings);
- `segmentation.serving`: the server's request handling (settings, request parsing and answers,
  URL policy, API keys, the batched model pool, the web page); `service.py` wires it into BentoML;
- `segmentation.data`: data tools (users' masks to training text, fine-tuning sets, evaluation,
  bulk labelling).

The modules at this level are the stable public names (`segmentation.tokens`, `segmentation.vae`,
`segmentation.masks`, `segmentation.Segmenter`, ...). `from segmentation import Segmenter` loads the
model side lazily, so the light modules import without torch or JAX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .model.results import DetectedObject, SegmentationResult

if TYPE_CHECKING:
    from .model.predictions import Prediction
    from .model.segmenter import Segmenter

__all__ = ["DetectedObject", "Prediction", "SegmentationResult", "Segmenter"]


def __getattr__(name: str):
    if name == "Segmenter":
        from .model.segmenter import Segmenter

        return Segmenter
    if name == "Prediction":
        from .model.predictions import Prediction

        return Prediction
    raise AttributeError(f"module 'segmentation' has no attribute {name!r}")
