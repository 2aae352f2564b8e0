"""A random PaliGemma 2 (the tiny fixture's Gemma 2 and SigLIP shapes, 56 px pictures so the
interpreter stays quick) with the batch-invariant mode registered for the CPU under Triton's
interpreter: a row's logits are the same bits in a batch as alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from invariant_helpers import load_kernels
from PIL import Image

from segmentation.model import invariant
from segmentation.model.invariant.interpreter import position_invariant_dot

load_kernels()
IMAGE_SIZE = 56  # 16 image tokens instead of the tiny fixture's 256


@pytest.fixture(scope="module")
def micro():
    import make_tiny_model

    spec = dict(make_tiny_model.SIZES["tiny"], image_size=IMAGE_SIZE)
    make_tiny_model.SIZES["micro"] = spec
    try:
        tokenizer = make_tiny_model.build_tokenizer()
        model = make_tiny_model.build_paligemma(tokenizer, "micro", seed=0).eval()
    finally:
        del make_tiny_model.SIZES["micro"]
    return model, make_tiny_model.build_processor(tokenizer, IMAGE_SIZE)


@pytest.fixture
def mode():
    with invariant.batch_invariant("cpu"), position_invariant_dot():
        yield


def pictures(count):
    return [Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40 + 7 * seed, 60, 3), dtype=np.uint8))
            for seed in range(count)]


PROMPTS = ["segment cat", "detect dog ; car", "segment the man on the left", "detect tree"]


def test_forward_rows_equal_alone(micro, mode):
    model, processor = micro
    # One fixed padded length for every batch, as a fixed-shape engine pads.
    inputs = processor(images=pictures(4), text=["<image>" + p for p in PROMPTS], return_tensors="pt",
                       padding="max_length", max_length=IMAGE_SIZE**2 // 14**2 + 12)
    inputs.pop("labels", None)
    with torch.inference_mode():
        batch = model(**inputs).logits
        invariant.disable("cpu")
        plain = model(**inputs).logits
        invariant.enable("cpu")
        torch.testing.assert_close(batch, plain, atol=1e-4, rtol=1e-4)  # the same model, other kernels
        for i in (0, 3):
            alone = model(**{k: v[i:i + 1] for k, v in inputs.items()}).logits
            assert torch.equal(alone[0], batch[i]), i
        pair = model(**{k: v[2:4] for k, v in inputs.items()}).logits
        assert torch.equal(pair[1], batch[3])  # among other neighbours too

# The engine path (fast loop, grammar, log-probabilities) with the mode on: tests/model/test_invariant_bench.py
# runs scripts/bench_invariance.py, whose same-shape rows must come out bit-equal.
