"""The whole geometry with the fixture VAE that has learned masks: mask → text (encoder) →
`parse_objects` → decoder → paste gives back the mask, on held-out synthetic scenes."""

import numpy as np
import pytest

from segmentation.data.targets import ObjectMask, encode_objects
from segmentation.encoder import MaskEncoder
from segmentation.masks import paste_mask
from segmentation.tokens import box_to_pixels, parse_objects
from segmentation.vae import MaskDecoder
from train_vae_fixture import random_scene

HELD_OUT_SEED = 20261127  # training uses seed 0's shapes


def scenes(count: int = 12):
    """(height, width, masks): held-out images of 96..400 px a side with 2..5 shapes each."""
    rng = np.random.default_rng(HELD_OUT_SEED)
    for _ in range(count):
        height, width = (int(v) for v in rng.integers(96, 401, 2))
        yield height, width, random_scene(rng, height, width, int(rng.integers(2, 6)))


def round_trip(encoder, decoder, height, width, masks):
    """The masks back from the text of the whole image, and each object's pixel box."""
    labels = [f"shape {i}" for i in range(len(masks))]
    text = " ; ".join(encode_objects(encoder, [ObjectMask(m, label) for m, label in zip(masks, labels)]))
    objects = parse_objects(text)
    assert [o.label for o in objects] == labels
    maps = decoder.decode(np.array([o.codes for o in objects]))
    boxes = [box_to_pixels(o.locs, width, height) for o in objects]
    return [paste_mask(m, box, width, height) for m, box in zip(maps, boxes)], boxes


@pytest.fixture(scope="module")
def results(trained_vae):
    encoder, decoder = MaskEncoder.from_npz(trained_vae), MaskDecoder.from_npz(trained_vae)
    ious, box_errors = [], []
    for height, width, masks in scenes():
        back, boxes = round_trip(encoder, decoder, height, width, masks)
        for original, decoded, box in zip(masks, back, boxes):
            ious.append((original & decoded).sum() / (original | decoded).sum())
            rows, cols = np.flatnonzero(original.any(axis=1)), np.flatnonzero(original.any(axis=0))
            truth = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)  # x0, y0, x1, y1, end-exclusive
            box_errors += [abs(int(a) - int(b)) for a, b in zip(box, truth)]
    return np.array(ious), np.array(box_errors)


def test_masks_come_back(results):
    ious, _ = results
    assert len(ious) >= 30
    assert np.median(ious) >= 0.9, f"median IoU {np.median(ious):.3f}"
    assert np.percentile(ious, 10) >= 0.7, f"10th percentile IoU {np.percentile(ious, 10):.3f}"


def test_boxes_come_back_to_the_pixel(results):
    """Bins of 1/1023 and the evaluator's int(): a box edge may move by less than one pixel, which
    int() can turn into one whole pixel on images under 1023 px; never more, and most edges are exact."""
    _, edge_errors = results
    assert edge_errors.max() <= 1
    assert (edge_errors == 0).mean() >= 0.5


def test_a_random_vae_does_not_round_trip(tmp_path):
    """What the test above measures: the same pipeline with random weights gets nowhere near."""
    from make_vae_fixture import write_vae_npz

    random_npz = write_vae_npz(tmp_path / "random.npz", seed=0)
    encoder, decoder = MaskEncoder.from_npz(random_npz), MaskDecoder.from_npz(random_npz)
    ious = []
    for height, width, masks in scenes(3):
        back, _ = round_trip(encoder, decoder, height, width, masks)
        ious += [(m & b).sum() / (m | b).sum() for m, b in zip(masks, back)]
    assert np.median(ious) < 0.8
