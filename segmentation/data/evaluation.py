"""Evaluation metrics: big_vision's referring-segmentation evaluator, cumulative IoU, COCO mask AP.

big_vision (`big_vision/evaluators/proj/paligemma/transfers/segmentation.py`) scores only the *first
object* of each answer against the example's ground-truth mask and box:

- the answer's first 20 tokens must be 4 `<loc>` tokens (bins 0..1023) then 16 `<seg>` codes (0..127),
  with y2 > y1 and x2 > x1 on the bins; text before them makes the answer invalid (no skipping);
- box IoU is computed on fractions (`bin / 1023`) for every answer, invalid ones having an empty box;
  `boxacc@T` is the share of answers with box IoU >= T;
- the box in pixels is `int(fraction * side)` of the original image; an empty pixel box is invalid too;
- the mask is the decoder's 64x64 map resized as a float image to the box, `> 0`, in a full-size mask;
  its IoU with the ground-truth mask counts 0 for an invalid answer; `miou` is the mean over answers.

Added here: `ciou`, the summed intersections over the summed unions (RefCOCO papers' "overall IoU"),
and COCO mask AP through pycocotools' COCOeval with the model's scores. Where big_vision would divide
0 by 0 (an empty ground-truth mask and an empty predicted mask) the IoU counts 0, not NaN.

The pixel rules are those of `segmentation.model.tokens` and `segmentation.model.masks`, shared with
the service, so the metrics score exactly the masks the service answers.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..model.masks import paste_mask
from ..model.tokens import CODES_PER_MASK, LOC_BINS, SEG_CODES, ParsedObject, box_to_pixels
from .coco import pycocotools_rle
from .targets import Box

__all__ = [
    "BOX_IOU_THRESHOLDS",
    "ReferringScore",
    "box_iou",
    "box_of_locs",
    "coco_mask_ap",
    "first_object",
    "referring_metrics",
    "score_referring",
    "summarize_referring",
]

BOX_IOU_THRESHOLDS = (0.5, 0.75)
# The answer's first 20 tokens as text: 4 locations, then 16 mask codes.
_FIRST_OBJECT = re.compile(r"<loc(\d{4})>" * 4 + rf"((?:<seg\d{{3}}>){{{CODES_PER_MASK}}})")
_SEG = re.compile(r"<seg(\d{3})>")


def first_object(text: str) -> ParsedObject | None:
    """The answer's first object when big_vision counts it valid, else None.

    Valid: the text *starts* with 4 `<loc>` tokens in 0..1023 and 16 `<seg>` codes in 0..127, and
    y2 > y1, x2 > x1 on the bins. Whatever follows (label, other objects) is ignored.
    """
    match = _FIRST_OBJECT.match(text) if isinstance(text, str) else None
    if match is None:
        return None
    y1, x1, y2, x2 = (int(match.group(i)) for i in range(1, 5))
    codes = tuple(int(c) for c in _SEG.findall(match.group(5)))
    if max(y1, x1, y2, x2) >= LOC_BINS or max(codes) >= SEG_CODES or y2 <= y1 or x2 <= x1:
        return None
    return ParsedObject(label="", locs=(y1, x1, y2, x2), codes=codes, span=match.span())


def box_of_locs(locs: tuple[int, int, int, int]) -> Box:
    """The normalized (y1, x1, y2, x2) of four `<loc>` bins (0..1023): `bin / 1023`, as big_vision."""
    return tuple(v / (LOC_BINS - 1) for v in locs)


def box_iou(box: Box, other: Box) -> float:
    """IoU of two normalized (y1, x1, y2, x2) boxes; 0 when both are empty (big_vision's 0/0 compares
    False). Inverted sides (y2 < y1) count as empty."""
    def area(y1, x1, y2, x2):
        return max(y2 - y1, 0.0) * max(x2 - x1, 0.0)

    inter = area(max(box[0], other[0]), max(box[1], other[1]), min(box[2], other[2]), min(box[3], other[3]))
    union = area(*box) + area(*other) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass(frozen=True)
class ReferringScore:
    """One example under big_vision's rules: `iou` is 0 for an invalid answer; `intersection` and
    `union` are pixel counts (for cIoU; an invalid answer's union is the ground truth's area)."""

    valid: bool
    box_iou: float
    intersection: int
    union: int

    @property
    def iou(self) -> float:
        return self.intersection / self.union if self.valid and self.union > 0 else 0.0


def score_referring(
    predicted_box: Box | None,
    predicted_mask: np.ndarray | None,
    gt_mask: np.ndarray,
    gt_box: Box,
) -> ReferringScore:
    """Score one answer's first object against the ground truth.

    `predicted_box`: normalized (y1, x1, y2, x2) of the first object, None when the answer is invalid
    by its tokens (`first_object`). `predicted_mask`: bool `[H, W]` full-size mask, None when the answer
    is invalid (by its tokens, or because its pixel box is empty). `gt_mask`: bool `[H, W]`.
    `gt_box`: normalized (y1, x1, y2, x2) in 0..1, the order of `<loc>` tokens and `encode_object`.
    """
    gt_mask = np.asarray(gt_mask, dtype=bool)
    gt_area = int(gt_mask.sum())
    iou_of_boxes = box_iou(predicted_box, gt_box) if predicted_box is not None else 0.0
    if predicted_mask is None:
        return ReferringScore(False, iou_of_boxes, 0, gt_area)
    predicted_mask = np.asarray(predicted_mask, dtype=bool)
    if predicted_mask.shape != gt_mask.shape:
        raise ValueError(f"predicted mask {predicted_mask.shape} and ground truth {gt_mask.shape} differ in size")
    intersection = int(np.count_nonzero(predicted_mask & gt_mask))
    union = gt_area + int(predicted_mask.sum()) - intersection
    return ReferringScore(True, iou_of_boxes, intersection, union)


def summarize_referring(scores: Sequence[ReferringScore]) -> dict:
    """`miou`, `ciou`, `boxacc@0.5`, `boxacc@0.75`, `invalid`, `total`; rates are None without examples."""
    total = len(scores)
    union = sum(s.union for s in scores)
    summary = {
        "miou": sum(s.iou for s in scores) / total if total else None,
        "ciou": (sum(s.intersection for s in scores) / union if union else 0.0) if total else None,
    }
    for threshold in BOX_IOU_THRESHOLDS:
        summary[f"boxacc@{threshold}"] = sum(threshold <= s.box_iou for s in scores) / total if total else None
    summary["invalid"] = sum(not s.valid for s in scores)
    summary["total"] = total
    return summary


def referring_metrics(
    texts: Sequence[str],
    gt_masks: Sequence[np.ndarray],
    gt_boxes: Sequence[Box],
    decoder,
) -> dict:
    """big_vision's evaluator on model texts, plus `ciou`.

    `texts`: raw model answers. `gt_masks`: bool `[H, W]` masks at the original image size (H, W give
    the image size). `gt_boxes`: normalized (y1, x1, y2, x2) in 0..1 — big_vision's order, that of the
    `<loc>` tokens and of `segmentation.encoder.encode_object` (not the service's x-first
    `box_normalized`). `decoder`: a `MaskDecoder` (or a function) turning
    `[N, 16]` codes into `[N, 64, 64]` float maps. Keys: `miou`, `ciou`, `boxacc@0.5`, `boxacc@0.75`,
    `invalid`, `total`.
    """
    if not len(texts) == len(gt_masks) == len(gt_boxes):
        raise ValueError(f"{len(texts)} texts, {len(gt_masks)} masks and {len(gt_boxes)} boxes: give one of each")
    decode: Callable = getattr(decoder, "decode", decoder)
    firsts = [first_object(t) for t in texts]
    pixel_boxes = [
        box_to_pixels(obj.locs, mask.shape[1], mask.shape[0]) if obj else None for obj, mask in zip(firsts, gt_masks)
    ]
    usable = [i for i, box in enumerate(pixel_boxes) if box and box[2] > box[0] and box[3] > box[1]]
    codes = np.array([firsts[i].codes for i in usable], dtype=np.int32).reshape(-1, CODES_PER_MASK)
    maps = dict(zip(usable, decode(codes))) if usable else {}
    scores = []
    for i, (obj, mask, gt_box) in enumerate(zip(firsts, gt_masks, gt_boxes)):
        predicted = None
        if i in maps:
            predicted = paste_mask(maps[i], pixel_boxes[i], mask.shape[1], mask.shape[0])
        scores.append(score_referring(box_of_locs(obj.locs) if obj else None, predicted, mask, gt_box))
    return summarize_referring(scores)


def coco_mask_ap(ground_truth, detections: Iterable[dict], image_ids: Sequence[int] | None = None) -> dict:
    """COCO mask AP of `detections` against a `pycocotools.coco.COCO` ground truth (COCOeval, segm).

    `detections`: COCO result dicts `{"image_id", "category_id", "segmentation": RLE, "score"}`.
    `image_ids`: the evaluated images (default: all of the ground truth's). Returns `AP`, `AP50`,
    `AP75`, `AP_small`, `AP_medium`, `AP_large`, `AR1`, `AR10`, `AR100` (COCO's -1 = no such objects).
    """
    from pycocotools.cocoeval import COCOeval

    names = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100"]
    detections = [dict(d, segmentation=pycocotools_rle(d["segmentation"])) for d in detections]
    ids = list(image_ids) if image_ids is not None else ground_truth.getImgIds()
    if not detections:
        # COCO.loadRes cannot load an empty list; nothing detected scores 0 where there are objects.
        has_objects = bool(ground_truth.getAnnIds(imgIds=ids, iscrowd=False))
        return dict.fromkeys(names, 0.0 if has_objects else -1.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        results = ground_truth.loadRes(detections)
        evaluator = COCOeval(ground_truth, results, iouType="segm")
        evaluator.params.imgIds = ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(names, evaluator.stats)}

