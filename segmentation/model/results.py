"""Result types shared by the library, the service and the renderer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# (x0, y0, x1, y1) in pixels of the original image, end-exclusive, as big_vision's evaluator slices.
PixelBox = tuple[int, int, int, int]
# (x0, y0, x1, y1) as fractions of the image side (bin / 1023).
NormalizedBox = tuple[float, float, float, float]


@dataclass
class DetectedObject:
    """One object found in an image.

    `mask` is a boolean [height, width] array of the original image (None for detections and for
    objects whose 16 mask codes were cut off). `mask64` is the decoder's raw 64x64 output, kept so a
    caller can re-paste or build a soft mask without running the decoder again.
    """

    label: str
    score: float
    box: PixelBox
    box_normalized: NormalizedBox
    mask: np.ndarray | None = None
    mask64: np.ndarray | None = None

    @property
    def area(self) -> int:
        """Mask pixels, or the box area when there is no mask."""
        if self.mask is not None:
            # A soft (probability) mask counts the pixels the hard mask would hold.
            return int(np.count_nonzero(self.mask if self.mask.dtype == bool else self.mask > 0.5))
        x0, y0, x1, y1 = self.box
        return max(x1 - x0, 0) * max(y1 - y0, 0)


@dataclass
class SegmentationResult:
    """Everything one (image, prompt) pair produced."""

    prompt: str
    text: str
    width: int
    height: int
    objects: list[DetectedObject] = field(default_factory=list)

    # Conversions live in `conversions` (imported when called: it needs pycocotools, OpenCV for
    # polygons, and `supervision`, which the server never loads).
    def to_coco(self, image_id: int = 0, *, segmentation: str = "rle", categories: dict[str, int] | None = None,
                first_id: int = 1) -> list[dict]:
        """COCO annotations (RLE or polygons, `score`, category ids from the prompt's classes, 1..)."""
        from .conversions import to_coco

        return to_coco(self, image_id, segmentation=segmentation, categories=categories, first_id=first_id)

    def to_yolo_lines(self) -> list[str]:
        """YOLO segmentation lines `class x1 y1 ...` (normalized; class ids from the prompt, 0..)."""
        from .conversions import to_yolo_lines

        return to_yolo_lines(self)

    def to_supervision(self):
        """A `supervision.Detections` (needs the optional `supervision` package)."""
        from .conversions import to_supervision

        return to_supervision(self)
