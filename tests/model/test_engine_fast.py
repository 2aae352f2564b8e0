"""Our generation loops, `fast` (segmentation/model/fastgen.py) and `graph` (segmentation/model/graph/:
static cache, device grammar), against transformers' `generate` on the tiny random fixture: the same
tokens, log-probabilities, budgets and grammar, batched or not."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from segmentation.model.engine import PaliGemmaEngine
from segmentation.model.fastgen import GrowingLayer, grouped_attention, make_cache
from segmentation.model.graph.decoder import GraphSettings
from segmentation.model.prompts import parse_prompt


def random_image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def engines(tiny_fixtures):
    load = PaliGemmaEngine.from_pretrained
    engines = {name: load(tiny_fixtures / "paligemma", generation=name) for name in ("fast", "hf-generate")}
    # Buckets 1, 2, 4, 8: a batch of 3, 5 or 6 rows steps with idle rows beside it.
    engines["graph"] = load(tiny_fixtures / "paligemma", generation="graph", graph=GraphSettings(buckets=(1, 2, 4, 8)))
    return engines


LOOPS = ("fast", "graph")


CASES = [
    ((320, 240), "cat", "segment", 0),
    ((64, 200), "dog ; cat", "detect", 1),
    ((224, 224), "the man on the left", "segment", 2),
    ((33, 17), "car ; bus ; person", "segment", 3),
    ((500, 90), "tree", "detect", 4),
    ((120, 80), "bird ; horse", "segment", 5),
]


def assert_same(a, b):
    assert a.token_ids == b.token_ids
    assert a.text == b.text and a.token_spans == b.token_spans
    np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5)


@pytest.mark.parametrize("batch", [[3], [1, 2], list(range(6))])
def test_fast_loop_equals_generate(engines, batch):
    images = [random_image(*CASES[i][0], CASES[i][3]) for i in batch]
    prompts = [parse_prompt(CASES[i][1], CASES[i][2]) for i in batch]
    reference = engines["hf-generate"].generate(images, prompts)
    assert any(g.token_ids for g in reference)  # the comparison must cover generated tokens
    for loop in LOOPS:
        for a, b in zip(engines[loop].generate(images, prompts), reference):
            assert_same(a, b)


def test_labels_from_the_prompt_equal_generate(engines):
    images = [random_image(*CASES[i][0], CASES[i][3]) for i in range(6)]
    prompts = [replace(parse_prompt(CASES[i][1], CASES[i][2]), labels_from_prompt=i % 2 == 0) for i in range(6)]
    reference = engines["hf-generate"].generate(images, prompts)
    for loop in LOOPS:
        for a, b in zip(engines[loop].generate(images, prompts), reference):
            assert_same(a, b)


def test_fast_loop_keeps_per_row_budgets(engines):
    images = [random_image(90, 90, s) for s in range(3)]
    prompts = [parse_prompt("cat"), parse_prompt("dog", "detect"), parse_prompt("cat ; dog")]
    budgets = [30, 9, 52]
    reference = engines["hf-generate"].generate(images, prompts, max_new_tokens=budgets)
    for loop in LOOPS:
        for a, b, budget in zip(engines[loop].generate(images, prompts, max_new_tokens=budgets), reference, budgets):
            assert_same(a, b)
            assert len(a.token_ids) <= budget


def test_one_image_many_prompts_runs_the_vision_tower_once(tiny_fixtures):
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma")
    calls = []
    engine.model.model.vision_tower.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    image, other = random_image(200, 150, 7), random_image(150, 200, 8)
    prompts = [parse_prompt(p) for p in ("cat", "dog", "bird ; car", "person")]
    shared = engine.generate([image, image, other, image], prompts)
    assert calls == [2]  # two distinct pictures, one vision pass
    engine.share_images = False
    unshared = engine.generate([image, image, other, image], prompts)
    assert calls[1:] == [4]
    for a, b in zip(shared, unshared):
        assert_same(a, b)
    for picture, prompt, together in zip([image, image, other, image], prompts, shared):
        assert_same(together, engine.generate([picture], [prompt])[0])


def test_cache_falls_back_to_transformers_past_the_sliding_window(engines):
    """Past Gemma 2's sliding window the two layer kinds see different keys: DynamicCache handles it."""
    configs = [engines[name].model.config.text_config for name in ("fast", "hf-generate")]
    window = configs[0].sliding_window
    try:
        for config in configs:
            config.sliding_window = 200  # shorter than the 256 image tokens
        assert not isinstance(make_cache(engines["fast"].model.config, 300).layers[0], GrowingLayer)
        images = [random_image(100, 60, 1), random_image(60, 100, 2)]
        prompts = [parse_prompt("cat"), parse_prompt("car ; bus", "detect")]
        # The graph engine masks keys older than the window itself (its cache is static).
        graph = load_graph_engine(engines, sliding_window=200).generate(images, prompts)
        fast = engines["fast"].generate(images, prompts)
        reference = engines["hf-generate"].generate(images, prompts)
    finally:
        for config in configs:
            config.sliding_window = window
    for a, b, c in zip(fast, graph, reference):
        assert_same(a, c)
        assert_same(b, c)


def load_graph_engine(engines, sliding_window):
    """A graph engine over the same weights whose config has another sliding window."""
    import copy

    model = copy.deepcopy(engines["graph"].model)
    model.config.text_config.sliding_window = sliding_window
    return PaliGemmaEngine(model, engines["graph"].processor, generation="graph", graph=GraphSettings(buckets=(2,)))


@pytest.mark.parametrize("q_len", [1, 7])
def test_grouped_attention_equals_gemma2_eager_attention(q_len):
    torch.manual_seed(q_len)
    batch, kv_heads, groups, keys, dim = 3, 2, 4, 11, 16
    module = torch.nn.Module()
    module.head_dim, module.num_key_value_groups, module.training = dim, groups, False
    query = torch.randn(batch, kv_heads * groups, q_len, dim) * 3
    key, value = torch.randn(batch, kv_heads, keys, dim) * 3, torch.randn(batch, kv_heads, keys, dim)
    mask = torch.zeros(batch, 1, q_len, keys)
    mask[0, :, :, :4] = torch.finfo(torch.float32).min  # left padding of row 0
    for softcap in (None, 50.0):
        expected, _ = eager_attention_forward(module, query, key, value, mask, scaling=0.25, softcap=softcap)
        got, _ = grouped_attention(module, query, key, value, mask, scaling=0.25, softcap=softcap)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_growing_layer_refuses_to_overflow():
    layer = GrowingLayer(capacity=4)
    states = torch.zeros(1, 2, 3, 8)
    keys, _ = layer.update(states, states)
    assert keys.shape == (1, 2, 3, 8) and layer.get_seq_length() == 3
    with pytest.raises(RuntimeError, match="4 positions"):
        layer.update(states, states)


def test_unknown_generation_is_a_clear_error(tiny_fixtures):
    with pytest.raises(ValueError, match="fast, hf-generate"):
        PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="vllm")
