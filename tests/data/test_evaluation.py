"""big_vision's referring metrics, cIoU and COCO mask AP on hand-computed tables."""

import numpy as np
import pytest
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from segmentation.evaluation import (
    ReferringScore,
    box_iou,
    box_of_locs,
    coco_mask_ap,
    first_object,
    referring_metrics,
    summarize_referring,
)
from segmentation.model.encoding import mask_to_rle
from segmentation.model.predictions import ObjectPrediction as Obj
from segmentation.model.predictions import Prediction, assemble

SEGS = "".join(f"<seg{i:03d}>" for i in range(16))


def answer(y1, x1, y2, x2, tail=" cat"):
    return f"<loc{y1:04d}><loc{x1:04d}><loc{y2:04d}><loc{x2:04d}>{SEGS}{tail}"


def positive_maps(codes):
    """A decoder whose every map is positive: the pasted mask is exactly the pixel box."""
    return np.ones((len(codes), 64, 64), np.float32)


def mask(rows, cols, height=10, width=20):
    m = np.zeros((height, width), bool)
    m[rows, cols] = True
    return m


def test_first_object_follows_big_vision_validity():
    assert first_object(answer(1, 2, 3, 4)).locs == (1, 2, 3, 4)
    assert first_object(answer(1, 2, 3, 4) + " ; " + answer(5, 6, 7, 8)).codes == tuple(range(16))
    assert first_object(" " + answer(1, 2, 3, 4)) is None  # text before the object: not skipped
    assert first_object(answer(3, 2, 3, 4)) is None  # y2 == y1
    assert first_object(answer(1, 4, 3, 4)) is None  # x2 == x1
    assert first_object(answer(1, 2, 3, 4).replace("<seg015>", "")) is None  # 15 codes
    assert first_object(answer(1, 2, 3, 4).replace("<seg015>", "<seg128>")) is None  # code out of range
    assert first_object(answer(1, 2, 3, 1024)) is None  # bin out of range
    assert first_object("<loc0001><loc0002><loc0003><loc0004> cat") is None  # a detection has no codes
    assert first_object(None) is None


def test_referring_metrics_hand_computed_table():
    # 10x20 images (height 10, width 20, so a swapped box order changes the results); the positive
    # decoder makes each predicted mask its pixel box (int(bin/1023*side)). Boxes are (y1, x1, y2, x2).
    texts = [
        answer(0, 0, 1023, 511),  # rows 0..10, cols 0..int(9.99)=9: 90 px inside a 100 px truth: IoU 0.9
        "oops " + answer(0, 0, 1023, 1023),  # invalid: text before the first object
        answer(0, 0, 1023, 1023),  # the whole image against an empty ground truth: IoU 0
        answer(512, 512, 1023, 1023),  # touches the bottom-right border: rows 5..10, cols 10..20, exact: IoU 1
        answer(0, 0, 60, 1023),  # rows 0..int(0.587)=0 in pixels: invalid after int(), box IoU still counts
    ]
    gt_masks = [mask(slice(0, 10), slice(0, 10)), np.ones((10, 20), bool), np.zeros((10, 20), bool),
                mask(slice(5, 10), slice(10, 20)), mask(0, slice(0, 20))]
    gt_boxes = [(0, 0, 1, 0.5), (0, 0, 1, 1), (0, 0, 0, 0), (0.5, 0.5, 1, 1), (0, 0, 0.1, 1)]
    metrics = referring_metrics(texts, gt_masks, gt_boxes, positive_maps)
    assert metrics["total"] == 5
    assert metrics["invalid"] == 2
    assert metrics["miou"] == pytest.approx((0.9 + 0 + 0 + 1 + 0) / 5)
    # intersections 90 + 0 + 0 + 50 + 0 over unions 100 + 200 + 200 + 50 + 20
    assert metrics["ciou"] == pytest.approx(140 / 570)
    # box IoUs: 0.999, 0, 0, 0.998, (60/1023)/0.1 = 0.587 (with x-first boxes: 0.333, ..., 0.038)
    assert metrics["boxacc@0.5"] == pytest.approx(3 / 5)
    assert metrics["boxacc@0.75"] == pytest.approx(2 / 5)
    assert set(metrics) == {"miou", "ciou", "boxacc@0.5", "boxacc@0.75", "invalid", "total"}


def test_box_order_is_big_vision_y_first():
    """A tall thin box: its (y1, x1, y2, x2) fractions are the `<loc>` bins over 1023, and only the
    same order matches it."""
    tall = box_of_locs((0, 0, 1023, 256))
    assert tall == pytest.approx((0.0, 0.0, 1.0, 256 / 1023))
    assert box_iou(tall, (0, 0, 1, 0.25)) == pytest.approx(0.25 / (256 / 1023))
    assert box_iou(tall, (0, 0, 0.25, 1)) < 0.2
    metrics_tall = referring_metrics([answer(0, 0, 1023, 256)], [mask(slice(0, 10), slice(0, 5))],
                                     [(0, 0, 1, 0.25)], positive_maps)
    assert metrics_tall["boxacc@0.75"] == 1 and metrics_tall["miou"] == pytest.approx(1.0)


def test_referring_metrics_score_the_masks_the_library_answers(tiny_fixtures):
    """With the real decoder the metric's mask is the one `assemble` pastes for the first object."""
    from segmentation.vae import MaskDecoder

    decoder = MaskDecoder.from_npz(tiny_fixtures / "vae-oid.npz")
    text = answer(100, 200, 900, 800)
    [map64] = decoder.decode(np.arange(16, dtype=np.int32)[None])
    result = assemble(Prediction("segment cat", text, [Obj("cat", (100, 200, 900, 800), 1.0, map64)]), 30, 20)
    predicted = result.objects[0].mask
    assert predicted.any() and not predicted.all()
    gt = np.zeros((20, 30), bool)
    gt[5:15, 5:25] = True
    metrics = referring_metrics([text], [gt], [(5 / 20, 5 / 30, 15 / 20, 25 / 30)], decoder)
    expected = (predicted & gt).sum() / (predicted | gt).sum()
    assert metrics["miou"] == pytest.approx(expected)
    assert metrics["ciou"] == pytest.approx(expected)
    assert metrics["invalid"] == 0


def test_referring_metrics_refuses_mismatched_lists():
    with pytest.raises(ValueError, match="one of each"):
        referring_metrics([answer(1, 2, 3, 4)], [], [], positive_maps)


def test_summary_of_nothing_has_no_rates():
    assert summarize_referring([]) == {"miou": None, "ciou": None, "boxacc@0.5": None, "boxacc@0.75": None,
                                       "invalid": 0, "total": 0}
    assert ReferringScore(False, 0.9, 0, 10).iou == 0.0


def coco_ground_truth(objects):
    """A COCO ground truth of 20x20 images; `objects`: (image_id, category_id, bool mask)."""
    annotations = []
    for index, (image_id, category_id, m) in enumerate(objects, start=1):
        rle = mask_to_rle(m)
        encoded = {"size": rle["size"], "counts": rle["counts"].encode()}
        annotations.append({"id": index, "image_id": image_id, "category_id": category_id, "segmentation": rle,
                            "area": float(coco_mask.area(encoded)), "bbox": coco_mask.toBbox(encoded).tolist(),
                            "iscrowd": 0})
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "width": 20, "height": 20} for i in (1, 2)],
                  "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}], "annotations": annotations}
    gt.createIndex()
    return gt


def square(y, x, side=8):
    m = np.zeros((20, 20), bool)
    m[y:y + side, x:x + side] = True
    return m


def detection(image_id, category_id, m, score):
    return {"image_id": image_id, "category_id": category_id, "segmentation": mask_to_rle(m), "score": score}


def test_coco_mask_ap_hand_made_set():
    cat1, cat2, dog = square(0, 0), square(10, 10), square(2, 10)
    gt = coco_ground_truth([(1, 1, cat1), (2, 1, cat2), (1, 2, dog)])
    perfect = [detection(1, 1, cat1, 0.9), detection(2, 1, cat2, 0.8), detection(1, 2, dog, 0.7)]
    assert coco_mask_ap(gt, perfect)["AP"] == pytest.approx(1.0)

    # cats: a false positive ranked first, then both cats: precision 2/3 at every recall level;
    # dogs: perfect. AP = mean over categories = (2/3 + 1) / 2 at every IoU threshold.
    ranked = [detection(2, 1, square(0, 0), 0.95), detection(1, 1, cat1, 0.9), detection(2, 1, cat2, 0.8),
              detection(1, 2, dog, 0.7)]
    result = coco_mask_ap(gt, ranked)
    assert result["AP"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-3)
    assert result["AP50"] == pytest.approx(result["AP"])

    # a dog mask shifted by 4 of its 8 rows: IoU 4*8 / (12*8) = 1/3, below every threshold: dog AP 0.
    shifted = [detection(1, 1, cat1, 0.9), detection(2, 1, cat2, 0.8), detection(1, 2, square(6, 10), 0.7)]
    assert coco_mask_ap(gt, shifted)["AP"] == pytest.approx(0.5)


def test_coco_mask_ap_without_detections():
    gt = coco_ground_truth([(1, 1, square(0, 0))])
    assert coco_mask_ap(gt, [])["AP"] == 0.0
    assert coco_mask_ap(gt, [], image_ids=[2])["AP"] == -1.0  # no objects there: COCO's "undefined"
