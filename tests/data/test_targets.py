"""Users' masks to PaliGemma text: the crop, the antialiased resize, the bins and the text format."""

import numpy as np
import pytest

from make_vae_fixture import make_vae_checkpoint
from segmentation.data.targets import ObjectMask, TargetError, crop_to_64, encode_objects, location_bins, tight_box
from segmentation.encoder import MaskEncoder, encode_object
from segmentation.tokens import parse_objects


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "v.npz"
    np.savez(path, **make_vae_checkpoint(seed=1))
    return MaskEncoder.from_npz(path)


def scale_and_translate_reference(column: np.ndarray, out: int) -> np.ndarray:
    """TensorFlow's antialiased bilinear resize of one axis, written from its definition: output pixel
    i samples the input at (i + 0.5) × in/out with a triangle kernel widened by in/out when shrinking,
    the weights of pixels inside the input renormalized to sum 1."""
    size = len(column)
    scale = size / out
    width = max(scale, 1.0)
    centers = (np.arange(out) + 0.5) * scale
    weights = np.maximum(0.0, 1.0 - np.abs((np.arange(size) + 0.5)[None, :] - centers[:, None]) / width)
    return (weights / weights.sum(axis=1, keepdims=True)) @ column


def test_halving_uses_the_widened_triangle_kernel():
    """Shrinking 128 → 64 rows weighs input rows 2j-1..2j+2 by 1/8, 3/8, 3/8, 1/8: a step edge
    between rows 63 and 64 becomes ..., 1, 7/8, 1/8, 0, ... (plain bilinear would give 1, 0)."""
    mask = np.zeros((128, 64), bool)
    mask[:64] = True
    column = crop_to_64(mask, (0.0, 0.0, 1.0, 1.0))[:, 10]
    np.testing.assert_allclose(column[29:35], [1, 1, 0.875, 0.125, 0, 0], atol=1e-6)


def test_doubling_is_half_pixel_bilinear():
    mask = np.zeros((64, 32), bool)
    mask[:, :16] = True
    row = crop_to_64(mask, (0.0, 0.0, 1.0, 1.0))[5]
    np.testing.assert_allclose(row[29:35], [1, 1, 0.75, 0.25, 0, 0], atol=1e-6)


@pytest.mark.parametrize(("height", "width"), [(100, 64), (37, 211), (64, 64), (500, 9)])
def test_resize_matches_the_scale_and_translate_definition(height, width):
    rng = np.random.default_rng(height * width)
    mask = rng.random((height, width)) > 0.5
    got = crop_to_64(mask, (0.0, 0.0, 1.0, 1.0))
    rows = np.stack([scale_and_translate_reference(c, 64) for c in mask.astype(np.float64).T], axis=1)
    expected = np.stack([scale_and_translate_reference(r, 64) for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize(("height", "width"), [(100, 64), (37, 211), (500, 9)])
def test_resize_equals_jax_antialiased_resize(height, width):
    """JAX's `resize(..., antialias=True)` is the same scale-and-translate rule (slower: it compiles
    per crop size)."""
    import jax

    mask = np.random.default_rng(height).random((height, width)) > 0.5
    expected = jax.image.resize(mask.astype(np.float32), (64, 64), method="linear", antialias=True)
    np.testing.assert_allclose(crop_to_64(mask, (0.0, 0.0, 1.0, 1.0)), np.asarray(expected), atol=1e-5)


def test_crop_takes_rounded_rows_and_columns():
    mask = np.zeros((10, 20), bool)
    mask[2:4, 3:9] = True
    # y: round(10 × 0.25) = 2, round(10 × 0.45) = 4 (4.5 rounds half to even, as tf.round; half up
    # would take row 5, which is empty); x: round(20 × 0.15) = 3, round(20 × 0.45) = 9.
    crop = crop_to_64(mask, (0.25, 0.15, 0.45, 0.45))
    assert crop.min() > 0.999


def test_tight_box_is_end_exclusive():
    mask = np.zeros((50, 80), bool)
    mask[10:20, 30:41] = True
    assert tight_box(mask) == (10 / 50, 30 / 80, 20 / 50, 41 / 80)


def test_location_bins_round_and_clip():
    assert location_bins((0.0, 0.5, 1.0, 0.0004)) == (0, 512, 1023, 0)  # 511.5 → 512 (half to even)
    assert location_bins((0.2, 0.3, 0.6, 0.7)) == (205, 307, 614, 716)


def test_text_reads_back_with_parse_objects(encoder):
    mask = np.zeros((60, 90), np.uint8)
    mask[12:40, 20:77] = 255
    text = encode_object(encoder, mask, "red car")
    [obj] = parse_objects(text)
    assert obj.label == "red car"
    assert obj.locs == location_bins((12 / 60, 20 / 90, 40 / 60, 77 / 90))
    expected_codes = encoder.encode(crop_to_64(mask > 0, tight_box(mask > 0))[None])[0]
    assert obj.codes == tuple(expected_codes)
    assert text == "".join(f"<loc{v:04d}>" for v in obj.locs) + "".join(f"<seg{c:03d}>" for c in obj.codes) \
        + " red car"


def test_uint8_and_bool_masks_agree_and_box_is_used(encoder):
    rng = np.random.default_rng(0)
    mask = rng.random((40, 40)) > 0.4
    assert encode_object(encoder, mask, "a") == encode_object(encoder, mask.astype(np.uint8), "a")
    boxed = encode_object(encoder, mask, "a", box=(0.1, 0.2, 0.5, 0.9))
    assert parse_objects(boxed)[0].locs == location_bins((0.1, 0.2, 0.5, 0.9))


def test_batch_equals_one_at_a_time(encoder):
    rng = np.random.default_rng(4)
    objects = [ObjectMask(rng.random((h, w)) > 0.5, f"thing {i}") for i, (h, w) in
               enumerate([(30, 50), (64, 64), (200, 17), (9, 9), (120, 80)])]
    together = encode_objects(encoder, objects)
    assert together == [encode_object(encoder, o.mask, o.label) for o in objects]


def test_empty_label_has_no_trailing_space(encoder):
    mask = np.ones((8, 8), bool)
    text = encode_object(encoder, mask, "")
    assert text.endswith(">") and parse_objects(text)[0].label == ""


@pytest.mark.parametrize(
    ("mask", "label", "box", "message"),
    [(np.zeros((5, 5), bool), "a", None, "empty"),
     (np.ones((2, 5, 5), bool), "a", None, "2-D"),
     (np.ones((5, 5), np.float32), "a", None, "bool or uint8"),
     (np.ones((5, 5), bool), "a ; b", None, "';'"),
     (np.ones((5, 5), bool), "a<seg001>", None, "'<'"),
     (np.ones((5, 5), bool), "a", (0.5, 0.1, 0.2, 0.9), "y1 < y2"),
     (np.ones((5, 5), bool), "a", (0.1, 0.1, 0.9), "four numbers"),
     (np.ones((5, 5), bool), "a", (0.1, 0.1, 1.5, 0.9), "<= 1"),
     (np.ones((5, 5), bool), "a", (0.0, 0.0, 0.05, 0.05), "no whole pixel")],
)
def test_bad_objects_are_named(encoder, mask, label, box, message):
    with pytest.raises(TargetError, match=message):
        encode_object(encoder, mask, label, box)
