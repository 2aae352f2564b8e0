"""The overlay picture: translucent masks, boxes, labels and scores drawn on the original image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .results import DetectedObject

# Distinct, colour-blind-friendly colours (Okabe-Ito, then Tableau), cycled per object.
PALETTE = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
    (204, 121, 167), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
)


def color_for(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with the tag's fill (WCAG relative luminance).

    The tag carries its own fill, so the text is readable whatever the picture shows behind it; black
    on the darker blues and reds of the palette would fall below a 4.5:1 contrast ratio.
    """
    linear = [c / 255 / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in background]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return (0, 0, 0) if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else (255, 255, 255)


def _font(height: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=max(12, height // 40))
    except (TypeError, OSError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_overlay(
    image: Image.Image, objects: Sequence[DetectedObject], alpha: float = 0.45
) -> Image.Image:
    """A new RGB image of the input's size with every object drawn on it."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    for index, obj in enumerate(objects):
        if obj.mask is None:
            continue
        if obj.mask.shape != base.shape[:2]:
            raise ValueError(f"mask of {obj.label!r} has shape {obj.mask.shape}, image is {base.shape[:2]}")
        mask = obj.mask if obj.mask.dtype == bool else obj.mask > 0.5
        base[mask] = base[mask] * (1 - alpha) + np.array(color_for(index), np.float32) * alpha
    canvas = Image.fromarray(base.round().astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(canvas)
    font = _font(canvas.height)
    line = max(1, round(min(canvas.size) / 200))
    for index, obj in enumerate(objects):
        color = color_for(index)
        x0, y0, x1, y1 = obj.box
        if x1 > x0 and y1 > y0:  # PIL refuses inverted rectangles; an empty box has no outline
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=color, width=line)
        tag = f"{obj.label} {obj.score:.2f}".strip()
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
        tag_w, tag_h = right - left + 6, bottom - top + 4
        ty = y0 - tag_h if y0 - tag_h >= 0 else y0  # above the box, or inside it at the top edge
        tx = max(0, min(x0, canvas.width - tag_w))  # keep the tag on the picture
        draw.rectangle((tx, ty, tx + tag_w, ty + tag_h), fill=color)
        draw.text((tx + 3 - left, ty + 2 - top), tag, fill=_text_color(color), font=font)
    return canvas
