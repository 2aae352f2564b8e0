import numpy as np
import pytest

from segmentation.model.masks import paste_mask, paste_soft_mask


def half_pattern():
    """Left half positive, right half negative."""
    m = np.full((64, 64), -1.0, np.float32)
    m[:, :32] = 1.0
    return m


def square_pattern():
    """A positive square in the middle quarter."""
    m = np.full((64, 64), -1.0, np.float32)
    m[16:48, 16:48] = 1.0
    return m


@pytest.mark.parametrize(
    ("width", "height", "box"),
    [(640, 480, (100, 50, 300, 250)), (100, 100, (0, 0, 100, 100)), (50, 80, (10, 70, 50, 80)),
     (320, 240, (0, 0, 64, 64)), (33, 17, (1, 1, 32, 16)), (1000, 10, (500, 0, 1000, 10)),
     (7, 5, (0, 4, 7, 5)), (300, 300, (2, 0, 129, 300))],
)
def test_half_pattern_splits_the_box(width, height, box):
    x0, y0, x1, y1 = box
    mask = paste_mask(half_pattern(), box, width, height)
    assert mask.shape == (height, width) and mask.dtype == bool
    outside = mask.copy()
    outside[y0:y1, x0:x1] = False
    assert not outside.any()
    inside = mask[y0:y1, x0:x1]
    # Every row is the same; True columns come first. The pattern is antisymmetric about its middle
    # and bilinear resampling keeps that symmetry, so the zero crossing sits at the box's centre:
    # exactly half the columns for an even width, one of the two halves for an odd one.
    assert (inside == inside[0]).all()
    columns = inside[0]
    boundary = int(columns.sum())
    assert columns[:boundary].all() and not columns[boundary:].any()
    assert boundary in {(x1 - x0) // 2, (x1 - x0 + 1) // 2}


@pytest.mark.parametrize(("width", "height", "box"), [(200, 200, (20, 40, 148, 168)), (64, 64, (0, 0, 64, 64))])
def test_square_pattern_lands_in_the_middle(width, height, box):
    x0, y0, x1, y1 = box
    mask = paste_mask(square_pattern(), box, width, height)
    w, h = x1 - x0, y1 - y0
    ys, xs = np.nonzero(mask)
    assert abs(xs.min() - (x0 + w / 4)) <= 1 and abs(xs.max() + 1 - (x0 + 3 * w / 4)) <= 1
    assert abs(ys.min() - (y0 + h / 4)) <= 1 and abs(ys.max() + 1 - (y0 + 3 * h / 4)) <= 1


def test_identity_size_keeps_the_pattern_exactly():
    pattern = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    mask = paste_mask(pattern, (10, 20, 74, 84), 100, 100)
    np.testing.assert_array_equal(mask[20:84, 10:74], pattern > 0)


def test_one_pixel_box():
    mask = paste_mask(np.ones((64, 64), np.float32), (5, 7, 6, 8), 10, 10)
    assert mask.sum() == 1 and mask[7, 5]


@pytest.mark.parametrize("box", [(5, 5, 5, 9), (5, 5, 9, 5), (9, 9, 3, 3)])
def test_degenerate_boxes_give_empty_masks(box):
    assert not paste_mask(np.ones((64, 64), np.float32), box, 10, 10).any()
    assert not paste_soft_mask(np.ones((64, 64), np.float32), box, 10, 10).any()


def test_boxes_past_the_border_are_clipped():
    mask = paste_mask(np.ones((64, 64), np.float32), (-5, -5, 20, 20), 10, 10)
    assert mask.all()


def test_soft_mask_agrees_with_the_hard_mask():
    pattern = np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32) * 3
    box = (3, 9, 90, 60)
    soft = paste_soft_mask(pattern, box, 100, 70)
    hard = paste_mask(pattern, box, 100, 70)
    assert soft.dtype == np.float32 and soft.min() >= 0 and soft.max() <= 1
    np.testing.assert_array_equal(soft > 0.5, hard)


def test_rejects_wrong_shape():
    with pytest.raises(AssertionError):
        paste_mask(np.ones((32, 32), np.float32), (0, 0, 5, 5), 10, 10)
