"""Result conversions: COCO (read back with pycocotools), YOLO segmentation lines, supervision."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from segmentation.model.conversions import category_ids
from segmentation.model.results import DetectedObject, SegmentationResult


def disc(width: int, height: int, cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


@pytest.fixture
def result() -> SegmentationResult:
    """Two masked objects, one detection without a mask, one label outside the prompt."""
    w, h = 120, 80
    return SegmentationResult(prompt="segment cat ; dog", text="...", width=w, height=h, objects=[
        DetectedObject("dog", 0.9, (10, 10, 41, 41), (0.1, 0.1, 0.3, 0.5), mask=disc(w, h, 25, 25, 15)),
        DetectedObject("cat", 0.5, (60, 20, 101, 61), (0.5, 0.2, 0.8, 0.7), mask=disc(w, h, 80, 40, 20)),
        DetectedObject("cat", 0.25, (0, 0, 5, 7), (0.0, 0.0, 0.04, 0.08)),
        DetectedObject("bird", 0.1, (1, 1, 9, 9), (0.0, 0.0, 0.08, 0.1), mask=disc(w, h, 5, 5, 3)),
    ])


def load_coco(result: SegmentationResult, annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 7, "file_name": "a.png", "width": result.width, "height": result.height}],
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for name, i in category_ids(result).items()],
    }
    coco.createIndex()
    return coco


def test_coco_rle_round_trips_through_pycocotools(result):
    annotations = result.to_coco(image_id=7, first_id=11)
    coco = load_coco(result, annotations)
    assert [a["id"] for a in annotations] == [11, 12, 13, 14]
    # The prompt's classes first (cat 1, dog 2), then labels the prompt did not name (bird 3).
    assert [a["category_id"] for a in annotations] == [2, 1, 1, 3]
    assert [a["score"] for a in annotations] == [0.9, 0.5, 0.25, 0.1]
    assert annotations[0]["bbox"] == [10, 10, 31, 31]
    assert annotations[2]["area"] == 35 and "segmentation" not in annotations[2]
    for annotation, obj in zip(annotations[:2] + annotations[3:], result.objects[:2] + result.objects[3:]):
        assert np.array_equal(coco.annToMask(coco.anns[annotation["id"]]).astype(bool), obj.mask)
        assert annotation["area"] == int(obj.mask.sum())


def test_coco_polygons_cover_the_mask(result):
    annotations = result.to_coco(image_id=7, segmentation="polygon")
    coco = load_coco(result, annotations[:2])
    for annotation, obj in zip(annotations[:2], result.objects[:2]):
        drawn = coco.annToMask(annotation).astype(bool)
        overlap = (drawn & obj.mask).sum() / (drawn | obj.mask).sum()
        assert overlap > 0.9  # a polygon outline of a disc, rasterized again
    with pytest.raises(ValueError, match="accepted: rle, polygon"):
        result.to_coco(segmentation="png")


def test_yolo_lines_are_normalized_polygons_with_prompt_class_ids(result):
    lines = result.to_yolo_lines()
    # dog is class 1, cat 0, bird (not in the prompt) 2; no line for the object without a mask.
    assert [line.split()[0] for line in lines] == ["1", "0", "2"]
    for line, obj in zip(lines, result.objects[:2] + result.objects[3:]):
        points = np.array(line.split()[1:], dtype=float).reshape(-1, 2) * (result.width, result.height)
        x0, y0, x1, y1 = obj.box
        assert len(points) >= 3
        assert points[:, 0].min() >= x0 - 1 and points[:, 0].max() <= x1
        assert points[:, 1].min() >= y0 - 1 and points[:, 1].max() <= y1


def test_supervision_detections(result):
    detections = result.to_supervision()
    assert len(detections) == 4
    assert detections.xyxy.tolist() == [list(map(float, o.box)) for o in result.objects]
    assert detections.class_id.tolist() == [1, 0, 0, -1]
    assert detections.confidence.tolist() == pytest.approx([0.9, 0.5, 0.25, 0.1])
    assert detections.mask is None  # one object has no mask
    assert detections.data["class_name"].tolist() == ["dog", "cat", "cat", "bird"]
    masked = SegmentationResult(result.prompt, "", result.width, result.height, result.objects[:2]).to_supervision()
    assert masked.mask.shape == (2, result.height, result.width)
    assert np.array_equal(masked.mask[1], result.objects[1].mask)


def test_library_results_convert(segmenter):
    """Real model output (the tiny fixtures) through COCO and back."""
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 130, 3), dtype=np.uint8))
    [real] = segmenter.segment([image], "cat ; dog ; car")
    masked = [o for o in real.objects if o.mask is not None]
    assert masked, "the tiny fixtures should give masked objects"
    annotations = real.to_coco(image_id=7)
    coco = load_coco(real, annotations)
    decoded = [coco.annToMask(a).astype(bool) for a in annotations if "segmentation" in a]
    assert all(np.array_equal(d, o.mask) for d, o in zip(decoded, masked))
    assert len(real.to_supervision()) == len(real.objects)
