"""The public tier's answer, made one object at a time, is the library's answer (api.answer_body)."""

from __future__ import annotations

import numpy as np
import pytest

from segmentation.model.bodies import MASK_FORMATS, response_body
from segmentation.model.predictions import ObjectPrediction, Prediction, assemble
from segmentation.serving.api import answer_body


@pytest.mark.parametrize("mask_format", MASK_FORMATS)
def test_one_object_at_a_time_gives_the_same_body(mask_format):
    rng = np.random.default_rng(3)
    objects = [ObjectPrediction("cat", (100, 200, 700, 900), 0.9, rng.normal(size=(64, 64)).astype(np.float32)),
               ObjectPrediction("dog", (0, 0, 1023, 1023), 0.5, rng.normal(size=(64, 64)).astype(np.float32)),
               ObjectPrediction("box only", (10, 10, 500, 300), 0.7, None),
               ObjectPrediction("empty", (500, 500, 500, 501), 0.1, None)]  # dropped: no whole pixel
    prediction = Prediction("segment cat ; dog", "<loc...>", objects, 40)
    expected = response_body(assemble(prediction, 333, 250), model="m", mask_format=mask_format)
    assert answer_body(prediction, 333, 250, model="m", mask_format=mask_format) == expected
    assert len(expected["objects"]) == 3
