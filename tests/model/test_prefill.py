"""The graph engine's own prefill (segmentation/model/graph/prefill.py) against transformers' eager prefill, in
float32 on the CPU, with both kernels (`eager`, and `flex`: compiled flex_attention): first-token logits within
1e-4, every layer's keys and values in the static cache, answers token for token, on left padding, mixed prompt
lengths, batched and solo rows, a sliding window shorter than the image, a causal suffix, and 224 px and 448 px
pictures (256 and 1024 image tokens); the kernel is chosen when the decoder is built and compiles once per
shape bucket."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from pictures import random_image
from transformers import DynamicCache

from segmentation.model.engine import PaliGemmaEngine
from segmentation.model.graph import prefill as prefill_module
from segmentation.model.graph.decoder import GraphSettings
from segmentation.model.graph.prefill import AttentionChoice, Prefill, choose_attention
from segmentation.model.images import model_input
from segmentation.model.prompts import parse_prompt

KERNELS = ("eager", "flex")
BUCKETS = (1, 2, 4)
PROMPTS = ["cat", "dog ; car ; the man on the left", "car ; bus", "bird ; horse ; tree"]  # 2, 10, 4, 6 tokens


@pytest.fixture(scope="module")
def base(tiny_fixtures) -> PaliGemmaEngine:
    return PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="fast")


@pytest.fixture(scope="module")
def wide():
    """The tiny model on 448 px pictures (1024 image tokens), built in memory."""
    from make_tiny_model import SIZES, build_paligemma, build_processor, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_paligemma(tokenizer, size="tiny-448", seed=1)
    return PaliGemmaEngine(model, build_processor(tokenizer, SIZES["tiny-448"]["image_size"]), generation="fast")


def graph_engine(fast: PaliGemmaEngine, kernel: str, *, sliding_window: int | None = None) -> PaliGemmaEngine:
    """A graph engine over the weights of `fast` (a copy when the config changes) with this prefill kernel."""
    model = fast.model
    if sliding_window is not None:
        model = copy.deepcopy(model)
        model.config.text_config.sliding_window = sliding_window
    return PaliGemmaEngine(model, fast.processor, generation="graph",
                           graph=GraphSettings(buckets=BUCKETS, prefill_attention=kernel))


def inputs_for(engine, count: int, seed: int = 0, suffix: str | None = None):
    images = [random_image(60 + 9 * i, 80 - 5 * i, seed + i) for i in range(count)]
    prompts = [parse_prompt(PROMPTS[(seed + i) % len(PROMPTS)]) for i in range(count)]
    pictures = [model_input(image, engine.image_size) for image in images]
    extra = {"suffix": [suffix] * count} if suffix else {}
    inputs = engine.processor(images=pictures, text=["<image>" + p.text for p in prompts], return_tensors="pt",
                              padding="longest", **extra)
    inputs.pop("labels", None)
    return dict(inputs), images, prompts


@torch.inference_mode()
def reference(model, inputs):
    """transformers' eager prefill: last-position float32 logits and the cache of every layer."""
    mask = inputs["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 1) + 1
    cache = DynamicCache(config=model.config.get_text_config())
    assert model.config.get_text_config()._attn_implementation == "eager"
    logits = model(**inputs, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits
    return logits[:, -1].float(), cache


def ours(engine, inputs, specs=None):
    """The graph engine's prefill into slots 0..n-1: its logits, and its decoder (whose cache holds the keys)."""
    decoder = engine.decoder
    count = inputs["input_ids"].shape[0]
    specs = specs or [engine.row_spec(parse_prompt("cat"), 8)] * count
    captured = {}
    forward = decoder.prefiller.forward

    def keep(*args, **kwargs):
        captured["logits"] = forward(*args, **kwargs)
        return captured["logits"]

    decoder.prefiller.forward = keep
    try:
        decoder.reset()
        decoder.prefill(list(range(count)), inputs, specs)
    finally:
        del decoder.prefiller.forward
    return captured["logits"], decoder


def assert_prefill_equal(engine, inputs):
    want_logits, cache = reference(engine.model, inputs)
    got_logits, decoder = ours(engine, inputs)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-4)
    assert torch.equal(got_logits.argmax(-1), want_logits.argmax(-1))
    count, length = inputs["input_ids"].shape
    for number, layer in enumerate(cache.layers):
        kept = layer.keys.shape[2]  # a sliding layer past its window keeps only its last keys
        for mine, theirs in ((decoder.keys[number], layer.keys), (decoder.values[number], layer.values)):
            torch.testing.assert_close(mine[:count, :, length - kept:length], theirs, rtol=1e-5, atol=1e-4)
    return got_logits


@pytest.mark.parametrize("kernel", KERNELS)
def test_prefill_equals_transformers_eager_prefill(base, kernel):
    """Mixed prompt lengths (left padding) batched, then each row alone: logits and keys of the eager prefill."""
    engine = graph_engine(base, kernel)
    inputs, _, _ = inputs_for(engine, 3)
    assert len(set(inputs["attention_mask"].sum(-1).tolist())) == 3  # three lengths: padding on two rows
    batched = assert_prefill_equal(engine, inputs)
    for row in range(3):
        alone = assert_prefill_equal(engine, {k: v[row:row + 1] for k, v in inputs.items()})
        torch.testing.assert_close(alone[0], batched[row], rtol=0, atol=1e-4)
    assert engine.graph_status()["prefill"]["attention"] == kernel


@pytest.mark.parametrize("kernel", KERNELS)
def test_prefill_with_a_sliding_window_shorter_than_the_image(base, kernel):
    """Window 200 < 256 image tokens: the prefix is still seen whole (bidirectional), as transformers masks it."""
    engine = graph_engine(base, kernel, sliding_window=200)
    inputs, _, _ = inputs_for(engine, 2, seed=5)
    assert_prefill_equal(engine, inputs)


@pytest.mark.parametrize("kernel", KERNELS)
def test_prefill_with_a_causal_suffix_and_a_short_window(base, kernel):
    """Token type 1 (a suffix, as in training) attends causally, and within the window on sliding layers: the
    part of the mask a served prompt never uses, checked all the same."""
    engine = graph_engine(base, kernel, sliding_window=3)
    inputs, _, _ = inputs_for(engine, 2, seed=7, suffix="<loc0001><loc0002> cat ; dog")
    assert int(inputs["token_type_ids"].sum()) >= 8  # suffix tokens on both rows
    assert_prefill_equal(engine, inputs)


@pytest.mark.parametrize("kernel", KERNELS)
def test_prefill_of_448_px_pictures(wide, kernel):
    engine = graph_engine(wide, kernel)
    inputs, _, _ = inputs_for(engine, 2, seed=3)
    assert inputs["input_ids"].shape[1] > 1024
    assert_prefill_equal(engine, inputs)


@pytest.mark.parametrize("fixture", ["base", "wide"])
def test_flex_prefill_answers_equal_the_eager_prefill(request, fixture):
    """Whole generations: the graph engine with the flex prefill, batched and alone, token for token as the
    `fast` loop (transformers' eager prefill), labels from the prompt included."""
    fast = request.getfixturevalue(fixture)
    engine = graph_engine(fast, "flex")
    count = 3 if fixture == "base" else 2
    _, images, prompts = inputs_for(engine, count, seed=11)
    prompts = [replace(p, labels_from_prompt=i % 2 == 0) for i, p in enumerate(prompts)]
    budgets = [40] * count
    got = engine.generate(images, prompts, max_new_tokens=budgets)
    want = fast.generate(images, prompts, max_new_tokens=budgets)
    assert sum(len(g.token_ids) for g in want) > 20 * count
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, atol=1e-4)
    for image, prompt, together in zip(images, prompts, got):
        [alone] = engine.generate([image], [prompt], max_new_tokens=[40])
        assert alone.token_ids == together.token_ids


def test_flex_compiles_once_per_shape_bucket(base):
    """Rows padded to the decoder's bucket and lengths to a multiple of 32: prompts of other lengths and row
    counts in one bucket reuse its kernel and its block mask; a new bucket compiles once."""
    from torch._dynamo.testing import CompileCounterWithBackend

    engine = graph_engine(base, "flex")
    decoder = engine.decoder
    counter = CompileCounterWithBackend("inductor")
    decoder.prefiller = Prefill(decoder, AttentionChoice("flex", "test"), compile_backend=counter)
    torch._dynamo.reset()
    three, _, _ = inputs_for(engine, 3, seed=2)  # 4, 6, 2 tokens
    four, _, _ = inputs_for(engine, 4, seed=0)
    assert three["input_ids"].shape[1] != four["input_ids"].shape[1]
    assert_prefill_equal(engine, three)  # bucket 4 x 288
    assert_prefill_equal(engine, four)
    assert counter.frame_count == 1
    assert_prefill_equal(engine, {k: v[:1] for k, v in four.items()})  # bucket 1 x 288
    assert_prefill_equal(engine, three)
    assert counter.frame_count == 2
    assert sorted(decoder.prefiller.buckets) == [(1, 288), (4, 288)]
    assert engine.graph_status()["prefill"]["buckets"] == ["1x288", "4x288"]


def test_the_kernel_is_chosen_at_start_and_shown(base, monkeypatch):
    cpu = torch.device("cpu")
    auto = choose_attention("auto", cpu)
    assert auto.kernel == "eager" and "slower" in auto.why
    assert choose_attention("flex", cpu).kernel == "flex"  # it compiles on this CPU
    monkeypatch.setattr(prefill_module, "flex_problem", lambda device: "no C++ compiler")
    refused = choose_attention("flex", cpu)
    assert refused.kernel == "eager" and "no C++ compiler" in refused.why
    with pytest.raises(ValueError, match="auto, flex, eager"):
        choose_attention("triton", cpu)
    engine = graph_engine(base, "flex")
    status = engine.graph_status()  # before the decoder is built: nothing chosen yet
    assert "prefill" not in status
    engine.decoder  # noqa: B018 -- built now, its kernel chosen
    prefill = engine.graph_status()["prefill"]
    assert prefill["attention"] == "eager" and "no C++ compiler" in prefill["why"]
    assert prefill["vision_attention"] == "sdpa"
