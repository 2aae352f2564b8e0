"""Users' masks (arrays, COCO polygons or RLE) to PaliGemma's training text, as big_vision made the
targets (`refcoco_mask2str`).

Per object: a normalized box (y1, x1, y2, x2) — given, or the mask's tight box, end-exclusive,
divided by the image size; the mask's rows/columns `round(side × box)` cropped and resized to 64×64
bilinearly with antialiasing (the scale-and-translate rule of TensorFlow's
`tf.image.resize(..., antialias=True)`), in [0, 1]; the 16 codes of the mask encoder; the box binned
as `clip(round(box × 1023), 0, 1023)`. The text is

    <locY1><locX1><locY2><locX2><segNNN>×16 label

which `segmentation.tokens.parse_objects` reads back; objects of one image join with " ; ".
Rounding is half-to-even (`np.round`), as `tf.round`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from .tokens import LOC_BINS

MASK_SIZE = 64
Box = tuple[float, float, float, float]


class TargetError(ValueError):
    """A mask, box or label that cannot become a training target; the message says why."""


@dataclass(frozen=True)
class ObjectMask:
    """One object of an image: a `[H, W]` mask (bool, or uint8 where nonzero is the object), its label,
    and optionally its normalized box (y1, x1, y2, x2) in [0, 1]."""

    mask: np.ndarray
    label: str = ""
    box: Sequence[float] | None = None


def binary_mask(mask) -> np.ndarray:
    """`[H, W]` bool from a bool or integer mask (nonzero = object: 0/1 and 0/255 alike)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or 0 in mask.shape:
        raise TargetError(f"a mask must be a 2-D [height, width] array, got shape {mask.shape}")
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
        raise TargetError(f"a mask must be bool or uint8 (nonzero = object), got dtype {mask.dtype}")
    return mask != 0


def tight_box(mask: np.ndarray) -> Box:
    """The normalized (y1, x1, y2, x2) of a bool `[H, W]` mask's pixels, end-exclusive: the first row
    and column with a pixel, and one past the last, divided by H and W."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise TargetError("the mask is empty: no pixel belongs to the object")
    height, width = mask.shape
    return (rows[0] / height, cols[0] / width, (rows[-1] + 1) / height, (cols[-1] + 1) / width)


def check_box(box: Sequence[float]) -> Box:
    """A normalized (y1, x1, y2, x2) with 0 <= y1 < y2 <= 1 and 0 <= x1 < x2 <= 1, as floats."""
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError) as exc:
        raise TargetError(f"box must be four numbers (y1, x1, y2, x2) in [0, 1], got {box!r}") from exc
    if len(values) != 4 or not all(np.isfinite(values)):
        raise TargetError(f"box must be four numbers (y1, x1, y2, x2) in [0, 1], got {box!r}")
    y1, x1, y2, x2 = values
    if not (0.0 <= y1 < y2 <= 1.0 and 0.0 <= x1 < x2 <= 1.0):
        raise TargetError(f"box (y1, x1, y2, x2) must satisfy 0 <= y1 < y2 <= 1 and 0 <= x1 < x2 <= 1, got {box!r}")
    return values


def crop_to_64(mask: np.ndarray, box: Box) -> np.ndarray:
    """The mask's rows/columns `round(side × box)` resized to `[64, 64]` float32 in [0, 1].

    `mask` is bool `[H, W]`. The resize is TensorFlow's `tf.image.resize(..., "bilinear",
    antialias=True)` rule: output pixel i samples the input at (i + 0.5) × in/out with a triangle
    kernel widened by in/out when shrinking, weights renormalized at the borders. Pillow's bilinear
    resize of a float image is that same rule (as is `jax.image.resize(..., antialias=True)`, which
    compiles anew for every crop size: about 1.7 s per object instead of well under a millisecond).
    """
    height, width = mask.shape
    y1, y2 = (int(v) for v in np.round(np.array([box[0], box[2]]) * height))
    x1, x2 = (int(v) for v in np.round(np.array([box[1], box[3]]) * width))
    if y2 <= y1 or x2 <= x1:
        raise TargetError(f"the box {box} covers no whole pixel of the {height}x{width} mask")
    crop = Image.fromarray(mask[y1:y2, x1:x2].astype(np.float32), mode="F")
    resized = np.asarray(crop.resize((MASK_SIZE, MASK_SIZE), resample=Image.Resampling.BILINEAR), np.float32)
    return np.clip(resized, 0.0, 1.0)


def location_bins(box: Box) -> tuple[int, int, int, int]:
    """(y1, x1, y2, x2) bins: `clip(round(box × 1023), 0, 1023)`."""
    bins = np.clip(np.round(np.asarray(box, np.float64) * (LOC_BINS - 1)), 0, LOC_BINS - 1).astype(int)
    return tuple(int(v) for v in bins)


def check_label(label: str) -> str:
    """A label the text format can carry: no `;` (the object separator), `<` (a token) or line break."""
    if not isinstance(label, str):
        raise TargetError(f"label must be a string, got {type(label).__name__}")
    if any(c in label for c in ";<\n\r"):
        raise TargetError(f"label {label!r} may not contain ';', '<' or line breaks")
    return label.strip()


def object_text(locs: Sequence[int], codes: Sequence[int], label: str) -> str:
    """`<locY1><locX1><locY2><locX2><segNNN>×16 label` (no trailing space for an empty label)."""
    text = "".join(f"<loc{v:04d}>" for v in locs) + "".join(f"<seg{c:03d}>" for c in codes)
    return f"{text} {label}" if label else text


def encode_objects(encoder, objects: Sequence[ObjectMask]) -> list[str]:
    """Each object's text (see the module docstring), the masks encoded as one batch.

    `encoder` is a `segmentation.encoder.MaskEncoder`. TargetError names the first bad object.
    """
    crops, bins, labels = [], [], []
    for index, obj in enumerate(objects):
        try:
            mask = binary_mask(obj.mask)
            box = tight_box(mask) if obj.box is None else check_box(obj.box)
            crops.append(crop_to_64(mask, box))
            bins.append(location_bins(box))
            labels.append(check_label(obj.label))
        except TargetError as exc:
            raise TargetError(f"object {index}: {exc}" if len(objects) > 1 else str(exc)) from None
    if not crops:
        return []
    codes = encoder.encode(np.stack(crops))
    return [object_text(b, c, label) for b, c, label in zip(bins, codes, labels)]


def encode_object(encoder, mask, label: str, box: Sequence[float] | None = None) -> str:
    """One object's training text: `mask` bool or uint8 `[H, W]`, `box` normalized (y1, x1, y2, x2)
    or None for the mask's tight box. TargetError (a ValueError) says what is wrong."""
    return encode_objects(encoder, [ObjectMask(mask, label, box)])[0]


# ---- COCO shapes (polygons, RLE) as masks: read by the server's /encode and the data tools ----------

def pycocotools_rle(rle: dict) -> dict:
    """A compressed RLE as pycocotools takes it: `counts` as bytes (JSON holds a str)."""
    counts = rle["counts"]
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


def compressed_rle_counts(counts: str) -> list[int] | None:
    """The run lengths a COCO compressed RLE string stands for, or None when it is malformed.

    The format: each run is a little-endian sequence of 5-bit groups, one character each (value + 48),
    0x20 marking that another group follows and 0x10 in the last group the sign; from the third run
    on, a run is stored as its difference to the run two before it.
    """
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                return None  # the string ends inside a run
            group = ord(counts[position]) - 48
            if not 0 <= group < 64:
                return None
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def segmentation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO `segmentation` (polygon list, uncompressed RLE with a counts list, or compressed RLE
    with a counts string) as a bool `[height, width]` mask. ValueError says what is malformed."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list)]
        if not polygons or len(polygons) != len(segmentation):
            raise ValueError("polygon segmentation must be a non-empty list of [x0, y0, x1, y1, ...] lists")
        for polygon in polygons:
            if len(polygon) < 6 or len(polygon) % 2 or not all(isinstance(v, int | float) for v in polygon):
                raise ValueError("each polygon needs at least 3 points as an even count of numbers")
        rles = coco_mask.frPyObjects(polygons, height, width)
        return coco_mask.decode(coco_mask.merge(rles)).astype(bool)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(v) for v in segmentation["size"]] != [height, width]:
            raise ValueError(f"RLE size {segmentation['size']} differs from the image's [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
                raise ValueError("uncompressed RLE counts must be non-negative integers")
            if sum(counts) != height * width:
                raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, not {height}x{width}")
            rle = coco_mask.frPyObjects(segmentation, height, width)
        elif isinstance(counts, str):
            # pycocotools trusts the string: runs that do not add up to the image leave memory unwritten.
            runs = compressed_rle_counts(counts)
            if runs is None or any(v < 0 for v in runs) or sum(runs) != height * width:
                raise ValueError(f"unreadable RLE: the compressed counts are malformed or do not cover the "
                                 f"{height}x{width} image")
            rle = pycocotools_rle(segmentation)
        else:
            raise ValueError("RLE counts must be a list of run lengths or a compressed string")
        try:
            return coco_mask.decode(rle).astype(bool)
        except Exception as exc:  # pycocotools raises bare exceptions on corrupt strings
            raise ValueError("unreadable RLE") from exc
    raise ValueError("segmentation must be a polygon list or an RLE {'size', 'counts'}")
