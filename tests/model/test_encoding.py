import base64
import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from segmentation.model.encoding import (
    image_to_png_base64,
    mask_to_png_base64,
    mask_to_polygons,
    mask_to_rle,
    png_base64_to_mask,
    rle_to_mask,
)


def random_mask(h, w, seed):
    return np.random.default_rng(seed).random((h, w)) > 0.6


@pytest.mark.parametrize(("h", "w"), [(1, 1), (17, 33), (480, 640), (7, 300)])
def test_rle_round_trip_with_pycocotools(h, w):
    mask = random_mask(h, w, h * w)
    rle = mask_to_rle(mask)
    assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
    decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), mask)
    assert coco_mask.area({"size": rle["size"], "counts": rle["counts"].encode()}) == mask.sum()
    np.testing.assert_array_equal(rle_to_mask(rle), mask)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (40, 30), (480, 640)])
def test_png_round_trip(h, w):
    mask = random_mask(h, w, 5)
    np.testing.assert_array_equal(png_base64_to_mask(mask_to_png_base64(mask)), mask)


def test_png_is_full_size_grayscale_with_255_for_the_object():
    mask = random_mask(12, 34, 9)
    with Image.open(io.BytesIO(base64.b64decode(mask_to_png_base64(mask)))) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "L", (34, 12))
        np.testing.assert_array_equal(np.asarray(image), np.where(mask, 255, 0))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_image_png_round_trip(mode):
    pixels = np.random.default_rng(2).integers(0, 256, (21, 13, len(mode)), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels)
    with Image.open(io.BytesIO(base64.b64decode(image_to_png_base64(image)))) as decoded:
        assert decoded.format == "PNG" and decoded.mode == mode
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image))


def test_rectangle_gives_one_polygon_with_its_bounds():
    mask = np.zeros((50, 80), bool)
    mask[10:30, 20:60] = True
    [polygon] = mask_to_polygons(mask)
    xs, ys = polygon[0::2], polygon[1::2]
    assert (min(xs), max(xs), min(ys), max(ys)) == (20, 59, 10, 29)


def test_empty_mask_has_no_polygons():
    assert mask_to_polygons(np.zeros((10, 10), bool)) == []


def test_two_blobs_give_two_polygons():
    mask = np.zeros((40, 40), bool)
    mask[2:10, 2:10] = True
    mask[20:35, 15:30] = True
    assert len(mask_to_polygons(mask)) == 2
