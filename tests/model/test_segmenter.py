"""The library's front door on the tiny fixtures: Segmenter, assemble, scores, and the model pool."""

import numpy as np
import pytest
from PIL import Image

from segmentation import Segmenter
from segmentation.model.predictions import Prediction, assemble
from segmentation.model.prompts import parse_prompt
from segmentation.model.tokens import box_to_pixels
from segmentation.serving.pool import GENERATION_FAILED, ModelPool, PredictRequest


def random_image(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


IMAGES = [random_image(320, 240, 0), random_image(100, 300, 1), random_image(224, 224, 2)]


def test_segment_gives_objects_with_masks_inside_their_boxes(segmenter):
    results = segmenter.segment(IMAGES, ["cat ; dog", "person", "segment car"])
    assert [r.prompt for r in results] == ["segment cat ; dog", "segment person", "segment car"]
    assert sum(len(r.objects) for r in results) > 0
    for image, result in zip(IMAGES, results):
        assert (result.width, result.height) == image.size
        for obj in result.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
            assert obj.mask is not None and obj.mask.shape == (image.height, image.width) and obj.mask.dtype == bool
            outside = obj.mask.copy()
            outside[y0:y1, x0:x1] = False
            assert not outside.any()
            assert obj.mask64.shape == (64, 64)
            assert 0.0 < obj.score <= 1.0
            assert obj.area == obj.mask.sum()


def test_detect_gives_boxes_without_masks(segmenter):
    [result] = segmenter.detect([IMAGES[0]], "cat")
    assert result.prompt == "detect cat" and result.objects
    assert all(o.mask is None and o.mask64 is None for o in result.objects)


def test_one_prompt_for_many_images_and_soft_masks(segmenter):
    hard = segmenter.segment(IMAGES[:2], "cat")
    soft = segmenter.segment(IMAGES[:2], "cat", soft=True)
    for h, s in zip(hard, soft):
        for ho, so in zip(h.objects, s.objects):
            assert so.mask.dtype == np.float32 and 0 <= so.mask.min() and so.mask.max() <= 1
            np.testing.assert_array_equal(so.mask > 0.5, ho.mask)


def test_batched_results_equal_one_at_a_time(segmenter):
    prompts = ["cat", "dog ; tree", "person"]
    together = segmenter.segment(IMAGES, prompts)
    for image, prompt, result in zip(IMAGES, prompts, together):
        [alone] = segmenter.segment([image], [prompt])
        assert alone.text == result.text
        assert [(o.label, o.box) for o in alone.objects] == [(o.label, o.box) for o in result.objects]
        # Scores come from logits that a batch computes with other float roundings.
        assert [o.score for o in alone.objects] == pytest.approx([o.score for o in result.objects], rel=1e-4)
        for a, b in zip(alone.objects, result.objects):
            np.testing.assert_array_equal(a.mask, b.mask)


def test_a_pre_resized_image_gives_the_same_answer(segmenter):
    """The service sends the model-size picture; the library the original: same text."""
    from segmentation.model.images import model_input

    original = IMAGES[1]
    [direct] = segmenter.predict([original], [parse_prompt("cat")])
    [resized] = segmenter.predict([model_input(original, segmenter.image_size)], [parse_prompt("cat")])
    assert direct.text == resized.text


def test_assemble_applies_the_evaluator_box_rule_and_drops_empty_boxes(segmenter):
    [prediction] = segmenter.predict([IMAGES[0]], [parse_prompt("cat")])
    for width, height in [(1000, 700), (3, 3)]:
        result = assemble(prediction, width, height)
        kept = [o for o in prediction.objects if box_to_pixels(o.locs, width, height)[2:] >
                box_to_pixels(o.locs, width, height)[:2]]
        assert len(result.objects) <= len(prediction.objects)
        for obj in result.objects:
            assert obj.box in [box_to_pixels(o.locs, width, height) for o in kept]


def test_prediction_round_trips_through_a_dict(segmenter):
    [prediction] = segmenter.predict([IMAGES[2]], [parse_prompt("cat ; dog")])
    again = Prediction.from_dict(prediction.to_dict())
    assert again.text == prediction.text and len(again.objects) == len(prediction.objects)
    for a, b in zip(again.objects, prediction.objects):
        assert (a.label, a.locs, a.score) == (b.label, b.locs, b.score)
        np.testing.assert_array_equal(a.mask64, b.mask64)


class FailingOnPrompt:
    """An engine whose generate raises when a batch holds a poisoned prompt, like an OOM on a bad item."""

    def __init__(self, engine, poison: str):
        self.engine, self.poison = engine, poison

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, images, prompts, **kwargs):
        if any(self.poison in p.classes for p in prompts):
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.engine.generate(images, prompts, **kwargs)


def test_pool_isolates_a_failing_request_and_groups_by_model(segmenter, caplog):
    pool = ModelPool({"a": segmenter.engine, "b": FailingOnPrompt(segmenter.engine, "poison")}, segmenter.decoder)
    requests = [
        PredictRequest("a", IMAGES[0], parse_prompt("cat")),
        PredictRequest("b", IMAGES[1], parse_prompt("dog")),
        PredictRequest("b", IMAGES[2], parse_prompt("poison")),
        PredictRequest("b", IMAGES[0], parse_prompt("tree")),
        PredictRequest("nope", IMAGES[0], parse_prompt("cat")),
    ]
    outcomes = pool.predict(requests)
    # The client reads that it failed; the cause goes to the server's log only.
    assert outcomes[2].status == 503 and outcomes[2].error == GENERATION_FAILED
    assert "out of memory (simulated)" in caplog.text
    assert outcomes[4].status == 400 and "served: a, b" in outcomes[4].error
    for i in (0, 1, 3):
        assert outcomes[i].error is None
        [alone] = segmenter.predict([requests[i].image], [requests[i].prompt])
        assert outcomes[i].prediction.text == alone.text


def test_from_pretrained_reports_missing_files(tiny_fixtures, tmp_path):
    with pytest.raises(FileNotFoundError):
        Segmenter.from_pretrained(tmp_path, tiny_fixtures / "vae-oid.npz")
    with pytest.raises(ValueError, match="missing.npz: mask decoder checkpoint not found"):
        Segmenter.from_pretrained(tiny_fixtures / "paligemma", tmp_path / "missing.npz")
