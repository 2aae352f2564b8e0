"""Results in formats other tools read: COCO annotations, YOLO segmentation lines, supervision.

Category ids come from the prompt's classes in order (`cat ; dog` → cat 1, dog 2; YOLO counts from
0). A label that is not one of the classes (the model may write other words) gets the next id, in
the order the objects come, so nothing the model found is dropped; supervision gives it class id -1.

Torch-free; OpenCV is needed only for polygons (`segmentation="polygon"`, YOLO), and `supervision`
only for `to_supervision`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .encoding import mask_to_polygons, mask_to_rle
from .prompts import parse_prompt
from .results import DetectedObject, SegmentationResult

CocoSegmentation = Literal["rle", "polygon"]


def prompt_classes(prompt: str) -> tuple[str, ...]:
    """The classes a prompt names, in order (`"segment cat ; dog"` → `("cat", "dog")`)."""
    return parse_prompt(prompt).classes


def coco_categories(classes: tuple[str, ...]) -> list[dict]:
    """COCO `categories`: ids 1.. in the prompt's order."""
    return [{"id": index + 1, "name": name} for index, name in enumerate(classes)]


def category_ids(result: SegmentationResult, categories: dict[str, int] | None = None) -> dict[str, int]:
    """Label → COCO category id: `categories` (default: the prompt's classes, 1..), extended with the
    result's other labels in order of appearance. A new dict; the argument is not changed."""
    if categories is None:
        categories = {c["name"]: c["id"] for c in coco_categories(prompt_classes(result.prompt))}
    ids = dict(categories)
    for obj in result.objects:
        if obj.label not in ids:
            ids[obj.label] = max(ids.values(), default=0) + 1
    return ids


def coco_annotation(obj: DetectedObject, image_id: int, category_id: int, segmentation: CocoSegmentation) -> dict:
    """One COCO annotation (no `id`): `bbox` [x, y, w, h] in pixels, `area` in mask pixels (box area
    without a mask), `segmentation` as RLE `{"size", "counts": str}` or polygons; none without a mask."""
    x0, y0, x1, y1 = obj.box
    annotation = {
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": obj.area,
        "iscrowd": 0,
        "score": float(obj.score),
    }
    if obj.mask is not None:
        annotation["segmentation"] = mask_to_rle(obj.mask) if segmentation == "rle" else mask_to_polygons(obj.mask)
    return annotation


def to_coco(
    result: SegmentationResult,
    image_id: int = 0,
    *,
    segmentation: CocoSegmentation = "rle",
    categories: dict[str, int] | None = None,
    first_id: int = 1,
) -> list[dict]:
    """COCO annotations of one image, numbered from `first_id`. `categories` maps label → category
    id (default: the prompt's classes, 1..); other labels get ids by `category_ids`."""
    if segmentation not in ("rle", "polygon"):
        raise ValueError(f"segmentation {segmentation!r} is not supported; accepted: rle, polygon")
    ids = category_ids(result, categories)
    annotations = [coco_annotation(obj, image_id, ids[obj.label], segmentation) for obj in result.objects]
    for offset, annotation in enumerate(annotations):
        annotation["id"] = first_id + offset
    return annotations


def to_yolo_lines(result: SegmentationResult, classes: tuple[str, ...] | None = None) -> list[str]:
    """YOLO segmentation lines `class x1 y1 x2 y2 ...` (coordinates as fractions of the image side,
    class ids: `classes` (default: the prompt's), other labels after them, 0..): one per outer contour
    of each object's mask. Objects without a mask give no line."""
    ids = category_ids(result, None if classes is None else {name: i + 1 for i, name in enumerate(classes)})
    lines = []
    for obj in result.objects:
        if obj.mask is None:
            continue
        for polygon in mask_to_polygons(obj.mask):
            points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2) / (result.width, result.height)
            coordinates = " ".join(f"{v:.6f}" for v in points.reshape(-1))
            lines.append(f"{ids[obj.label] - 1} {coordinates}")
    return lines


def to_supervision(result: SegmentationResult, classes: tuple[str, ...] | None = None):
    """A `supervision.Detections`: `xyxy` [N, 4] float pixels, `mask` bool [N, H, W] (when every
    object has one), `confidence` [N], `class_id` [N] (index in the prompt's classes, -1 if none),
    `data["class_name"]` [N]."""
    try:
        import supervision as sv
    except ImportError as exc:
        raise ImportError("to_supervision needs the optional package `supervision` (pip install supervision)") \
            from exc
    classes = prompt_classes(result.prompt) if classes is None else classes
    objects = result.objects
    masks = [o.mask for o in objects]
    return sv.Detections(
        xyxy=np.array([o.box for o in objects], dtype=np.float32).reshape(-1, 4),
        mask=np.stack(masks).astype(bool) if objects and all(m is not None for m in masks) else None,
        confidence=np.array([o.score for o in objects], dtype=np.float32),
        class_id=np.array([classes.index(o.label) if o.label in classes else -1 for o in objects], dtype=int),
        data={"class_name": np.array([o.label for o in objects], dtype=str)},
    )
