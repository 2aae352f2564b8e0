"""Parse PaliGemma detection/segmentation output into objects, by big_vision's evaluator rules.

The model writes, per object, four `<locNNNN>` tokens (y1, x1, y2, x2 bins in 0..1023), then for
`segment` prompts sixteen `<segNNN>` codes (0..127), then the label; objects are separated by ` ; `:

    <loc0120><loc0045><loc0890><loc0700><seg012>...<seg099> cat ; <loc0010>...<seg005> dog

Parsing never raises: text before the first object is skipped, a missing label becomes "", an object
cut short inside its codes (generation stopped) keeps its box with `codes=None`, and garbage yields
no objects. Whether a box is usable (y2 > y1, x2 > x1 in pixels) is decided by `box_to_pixels`'s
caller, since that depends on the image size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LOC_BINS = 1024
SEG_CODES = 128
CODES_PER_MASK = 16

_LOC = r"<loc(\d{4})>"
_SEG = r"<seg(\d{3})>"
# One object: exactly 4 locs, then up to 16 codes, then a label running to the next separator,
# the next object or the end. A label may hold spaces; `;` ends it.
_OBJECT = re.compile(
    rf"{_LOC}{_LOC}{_LOC}{_LOC}(?P<segs>(?:{_SEG})*)(?P<label>[^;<]*)"
)
_SEG_RE = re.compile(_SEG)


@dataclass(frozen=True)
class ParsedObject:
    """One object as written by the model.

    `locs` are the raw bins (y1, x1, y2, x2); `codes` the 16 mask codes, or None for a detection or
    for an object whose codes were cut off. `span` is the object's (start, end) character range in
    the text, used to find the tokens that produced it (for scores).
    """

    label: str
    locs: tuple[int, int, int, int]
    codes: tuple[int, ...] | None
    span: tuple[int, int] = (0, 0)


def parse_objects(text: str) -> list[ParsedObject]:
    """All well-formed-enough objects in `text`, in order. Never raises."""
    if not isinstance(text, str):
        return []
    objects = []
    for match in _OBJECT.finditer(text):
        locs = tuple(int(match.group(i)) for i in range(1, 5))
        if any(v >= LOC_BINS for v in locs):
            continue
        codes = tuple(int(c) for c in _SEG_RE.findall(match.group("segs")))
        # A short code run (generation stopped), a long one or an out-of-range code cannot be decoded
        # into a mask: the object stays a detection.
        if len(codes) != CODES_PER_MASK or any(c >= SEG_CODES for c in codes):
            codes = None
        objects.append(ParsedObject(
            label=match.group("label").strip(), locs=locs, codes=codes, span=match.span(),
        ))
    return objects


def box_normalized(locs: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) as fractions of the image side: bin / 1023, the training binning's inverse."""
    y1, x1, y2, x2 = locs
    return (x1 / (LOC_BINS - 1), y1 / (LOC_BINS - 1), x2 / (LOC_BINS - 1), y2 / (LOC_BINS - 1))


def box_to_pixels(locs: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in pixels of the original image: `int(bin / 1023 * side)`, as the evaluator.

    The box is end-exclusive (the evaluator slices `mask[y0:y1, x0:x1]`). It may be empty when
    y2 <= y1 or x2 <= x1, before or after the `int()`: see `is_valid_box`.
    """
    fx0, fy0, fx1, fy1 = box_normalized(locs)
    return (int(fx0 * width), int(fy0 * height), int(fx1 * width), int(fy1 * height))


def is_valid_box(box: tuple[int, int, int, int]) -> bool:
    """The evaluator's validity rule on a pixel box: x1 > x0 and y1 > y0."""
    x0, y0, x1, y1 = box
    return x1 > x0 and y1 > y0
