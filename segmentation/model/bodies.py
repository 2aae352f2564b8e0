"""The JSON answer of `/segment` and `/detect`: a result with its masks encoded as asked.

In the library, not the server: the server answers with it and the labelling tool writes the same
answers for a local model (`segmentation.data.labelling`), so both give the same bytes.
"""

from __future__ import annotations

from PIL import Image

from .encoding import image_to_png_base64, mask_to_png_base64, mask_to_polygons, mask_to_rle
from .results import DetectedObject, SegmentationResult

MASK_FORMATS = ("rle", "png", "polygon", "none")


def encode_mask(obj: DetectedObject, fmt: str) -> dict | None:
    if obj.mask is None or fmt == "none":
        return None
    if fmt == "rle":
        return {"format": "rle", **mask_to_rle(obj.mask)}
    if fmt == "png":
        return {"format": "png", "data": mask_to_png_base64(obj.mask)}
    return {"format": "polygon", "polygons": mask_to_polygons(obj.mask)}


def object_body(obj: DetectedObject, mask_format: str) -> dict:
    return {
        "label": obj.label,
        "score": round(float(obj.score), 6),
        "box": list(obj.box),
        "box_normalized": [round(v, 6) for v in obj.box_normalized],
        "area": obj.area,
        "mask": encode_mask(obj, mask_format),
    }


def response_body(
    result: SegmentationResult,
    *,
    model: str,
    mask_format: str,
    input_image: Image.Image | None = None,
) -> dict:
    """The JSON answer of /segment and /detect."""
    body = {
        "model": model,
        "width": result.width,
        "height": result.height,
        "prompt": result.prompt,
        "text": result.text,
        "objects": [object_body(o, mask_format) for o in result.objects],
    }
    if input_image is not None:
        body["input_image"] = image_to_png_base64(input_image)
    return body
