import numpy as np
import pytest
from PIL import Image

from segmentation.model.render import PALETTE, _text_color, render_overlay
from segmentation.model.results import DetectedObject


@pytest.mark.parametrize(("w", "h"), [(320, 240), (50, 90), (1024, 64)])
def test_overlay_colours_masks_and_leaves_the_rest(w, h):
    image = Image.fromarray(np.full((h, w, 3), 128, np.uint8))
    mask = np.zeros((h, w), bool)
    box = (w // 4, h // 2, w // 2, h - 1)
    mask[box[1] + 3:box[3] - 3, box[0] + 3:box[2] - 3] = True
    obj = DetectedObject(label="cat", score=0.87, box=box, box_normalized=(0, 0, 0, 0), mask=mask)
    overlay = render_overlay(image, [obj])
    assert overlay.mode == "RGB" and overlay.size == (w, h) and overlay.format is None
    pixels = np.asarray(overlay)
    assert (pixels[mask] != 128).any(axis=-1).all()
    # Outside the rows of the box and of its label tag (which may shift left to stay on the picture)
    # nothing changes.
    far = np.ones((h, w), bool)
    far[max(box[1] - 20, 0):box[3] + 2, :] = False
    assert far.any()
    assert (pixels[far] == 128).all()


def test_detections_without_masks_draw_boxes_only():
    image = Image.new("RGB", (100, 100), (0, 0, 0))
    obj = DetectedObject(label="dog", score=0.5, box=(40, 40, 90, 90), box_normalized=(0, 0, 0, 0))
    pixels = np.asarray(render_overlay(image, [obj]))
    assert pixels[60, 89].any()  # right edge of the box
    assert not pixels[65, 65].any()  # inside the box, nothing drawn


def test_grayscale_input_becomes_rgb():
    overlay = render_overlay(Image.new("L", (30, 20), 7), [])
    assert overlay.mode == "RGB" and overlay.size == (30, 20)


def test_degenerate_box_draws_no_outline_and_does_not_fail():
    image = Image.new("RGB", (60, 60), (9, 9, 9))
    obj = DetectedObject(label="x", score=0.1, box=(30, 30, 30, 40), box_normalized=(0, 0, 0, 0))
    pixels = np.asarray(render_overlay(image, [obj]))
    assert (pixels[35:, :] == 9).all()  # below the tag, nothing is drawn


def test_mask_of_another_size_is_refused():
    obj = DetectedObject(label="x", score=0.1, box=(0, 0, 5, 5), box_normalized=(0, 0, 0, 0),
                         mask=np.ones((5, 5), bool))
    with pytest.raises(ValueError, match="shape"):
        render_overlay(Image.new("RGB", (10, 10)), [obj])


def _luminance(rgb):
    linear = [(c / 255 / 12.92) if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


@pytest.mark.parametrize("fill", PALETTE)
def test_tag_text_contrasts_with_its_fill(fill):
    lighter, darker = sorted((_luminance(fill), _luminance(_text_color(fill))), reverse=True)
    assert (lighter + 0.05) / (darker + 0.05) >= 4.5
