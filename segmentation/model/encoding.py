"""Mask and image encodings for the API: COCO RLE, PNG, polygons (all from maintained libraries)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO RLE `{"size": [h, w], "counts": str}`; `pycocotools.mask.decode` reads it back."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict) -> np.ndarray:
    counts = rle["counts"]
    encoded = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return coco_mask.decode(encoded).astype(bool)


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def mask_to_png_base64(mask: np.ndarray) -> str:
    """A full-size 8-bit grayscale PNG (255 = object), base64."""
    return _png_base64(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"))


def png_base64_to_mask(data: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return np.asarray(image.convert("L")) > 127


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours as COCO polygons `[x0, y0, x1, y1, ...]` in pixel coordinates (holes dropped)."""
    import cv2  # here, not at the top: the client package has RLE and PNG without OpenCV

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        if len(contour) < 3:  # a point or a line: no area to outline
            continue
        polygons.append([float(v) for v in contour.reshape(-1)])
    return polygons


def image_to_png_base64(image: Image.Image) -> str:
    return _png_base64(image)
