"""Placing the decoder's 64x64 output into the original image, by big_vision's evaluator rule.

The raw float map is resized *as a float image* (PIL mode F, bilinear) to the pixel box, then
thresholded at 0 and placed into an all-False mask the size of the original image. The soft variant
maps the same resized values to probabilities with `clip(x * 0.5 + 0.5, 0, 1)`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

MASK_SIZE = 64


def _resized(mask64: np.ndarray, box: tuple[int, int, int, int], width: int, height: int):
    """The map resized to the box, and the box clipped to the image; None for an empty box."""
    assert mask64.shape == (MASK_SIZE, MASK_SIZE), mask64.shape
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return None, box
    resized = np.asarray(
        Image.fromarray(np.asarray(mask64, dtype=np.float32), mode="F").resize(
            (x1 - x0, y1 - y0), resample=Image.Resampling.BILINEAR
        )
    )
    # Boxes come from int(frac * side) and never leave the image; clip anyway for hand-made boxes.
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if cx1 <= cx0 or cy1 <= cy0:
        return None, box
    return resized[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0], (cx0, cy0, cx1, cy1)


def paste_mask(mask64: np.ndarray, box: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """Boolean `[height, width]` mask: the resized map `> 0.0` inside `box` (x0, y0, x1, y1)."""
    full = np.zeros((height, width), dtype=bool)
    resized, (x0, y0, x1, y1) = _resized(mask64, box, width, height)
    if resized is not None:
        full[y0:y1, x0:x1] = resized > 0.0
    return full


def paste_soft_mask(mask64: np.ndarray, box: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """Float32 `[height, width]` probabilities in [0, 1]; > 0.5 exactly where `paste_mask` is True."""
    full = np.zeros((height, width), dtype=np.float32)
    resized, (x0, y0, x1, y1) = _resized(mask64, box, width, height)
    if resized is not None:
        full[y0:y1, x0:x1] = np.clip(resized * 0.5 + 0.5, 0.0, 1.0)
    return full
