"""The PaliGemma engine on the tiny random fixture: batching, grammar, scores."""

import numpy as np
import pytest
from PIL import Image

from segmentation.model.engine import PaliGemmaEngine
from segmentation.model.prompts import parse_prompt
from segmentation.model.tokens import parse_objects


def random_image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def engine(tiny_fixtures):
    return PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma")


MIXED = [
    ((320, 240), "cat", "segment"),
    ((64, 200), "dog ; cat", "detect"),
    ((224, 224), "the man on the left", "segment"),
    ((33, 17), "car ; bus ; person", "segment"),
    ((500, 90), "tree", "detect"),
]


def test_batch_equals_one_at_a_time(engine):
    images = [random_image(w, h, seed) for seed, ((w, h), _, _) in enumerate(MIXED)]
    prompts = [parse_prompt(p, task) for _, p, task in MIXED]
    batched = engine.generate(images, prompts)
    for image, prompt, together in zip(images, prompts, batched):
        [alone] = engine.generate([image], [prompt])
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text
        np.testing.assert_allclose(together.token_logprobs, alone.token_logprobs, atol=1e-4)


def test_output_depends_on_image_and_prompt(engine):
    a, b = random_image(100, 100, 1), random_image(100, 100, 2)
    cat, dog = parse_prompt("cat"), parse_prompt("dog")
    texts = [g.text for g in engine.generate([a, b, a], [cat, cat, dog])]
    assert texts[0] != texts[1] and texts[0] != texts[2]


@pytest.mark.parametrize("seed", range(3))
def test_constrained_output_parses_into_well_formed_objects(engine, seed):
    prompts = [parse_prompt("cat ; dog"), parse_prompt("car", "detect")]
    images = [random_image(150, 90, seed), random_image(90, 150, seed + 10)]
    for prompt, generation in zip(prompts, engine.generate(images, prompts)):
        objects = parse_objects(generation.text)
        assert objects, generation.text
        assert len(generation.token_logprobs) == len(generation.token_ids)
        for obj in objects:
            y1, x1, y2, x2 = obj.locs
            assert y2 > y1 and x2 > x1 and obj.label
            assert (obj.codes is not None) == (prompt.task == "segment")
        assert len(generation.token_ids) <= engine.row_spec(prompt).budget


def test_unconstrained_output_never_crashes(tiny_fixtures):
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", constrained=False)
    images = [random_image(80, 60, s) for s in range(3)]
    prompts = [parse_prompt("cat"), parse_prompt("dog", "detect"), parse_prompt("a ; b ; c")]
    for generation in engine.generate(images, prompts):
        assert isinstance(generation.text, str)
        parse_objects(generation.text)  # must not raise, whatever the text


def test_token_spans_tile_the_text(engine):
    [generation] = engine.generate([random_image(50, 50, 0)], [parse_prompt("cat")])
    spans = generation.token_spans
    assert spans[0][0] == 0 and spans[-1][1] == len(generation.text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_forced_token_count(engine):
    [generation] = engine.generate([random_image(50, 50, 0)], [parse_prompt("cat")], max_new_tokens=[30])
    assert len(generation.token_ids) <= 30


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        PaliGemmaEngine.from_pretrained(tmp_path)
