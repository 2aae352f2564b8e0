"""LoRA adapters in the library: the checks that refuse bad adapter directories, and mixed batches of the
base and several adapters in one `generate` call answering exactly as each row alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from segmentation.model.adapters import AdapterError, check_lora_dir
from segmentation.model.engine import PaliGemmaEngine
from segmentation.model.prompts import parse_prompt
from segmentation.model.vae import MaskDecoder
from segmentation.serving.pool import ModelPool, PredictRequest

BUDGET = 40  # a forced token budget keeps the random model's answers short


def copy_adapter(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def rename_modules(adapter: Path) -> None:
    """Point the adapter's tensors at a layer the tiny base does not have (it has layers 0 and 1)."""
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}, weights)


def set_config(adapter: Path, **changes) -> None:
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))


def test_a_random_lora_adapter_passes_the_checks(lora_adapters, tiny_fixtures):
    config = check_lora_dir(lora_adapters["a"], tiny_fixtures / "paligemma")
    assert config.r == 4 and "q_proj" in config.target_modules


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json not found"),
        (lambda d: set_config(d, peft_type="PREFIX_TUNING"), "only LoRA adapters"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors not found"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"not safetensors"), "unreadable weights"),
        (rename_modules, "has no module 'model.language_model.layers.7."),
        (lambda d: set_config(d, target_modules=["nonexistent_proj"]), "match no module of the base"),
    ],
)
def test_bad_adapter_directories_are_refused_with_the_reason(lora_adapters, tiny_fixtures, tmp_path, damage,
                                                              message):
    adapter = copy_adapter(lora_adapters["a"], tmp_path / "adapter")
    damage(adapter)
    with pytest.raises(AdapterError, match=message.replace("(", r"\(")) as caught:
        check_lora_dir(adapter, tiny_fixtures / "paligemma")
    assert str(adapter) in str(caught.value)


def test_a_base_that_is_not_paligemma_is_refused(lora_adapters, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(AdapterError, match="expected 'paligemma'"):
        check_lora_dir(lora_adapters["a"], tmp_path)


@pytest.fixture(scope="module")
def adapted_engine(tiny_fixtures, lora_adapters) -> PaliGemmaEngine:
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma")
    engine.attach_adapters({"acme/a": lora_adapters["a"], "acme/b.v2": lora_adapters["b"]})
    return engine


def pictures(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (60 + 10 * i, 90, 3), dtype=np.uint8)) for i in range(count)]


def test_mixed_adapter_batch_equals_each_row_alone(adapted_engine, segmenter):
    images = pictures(6)
    prompts = [parse_prompt(p) for p in ("cat", "dog ; car", "cat", "the man on the left", "bird", "cat ; dog")]
    adapters = [None, "acme/a", "acme/b.v2", None, "acme/a", "acme/b.v2"]
    budgets = [BUDGET] * len(prompts)
    batch = adapted_engine.generate(images, prompts, max_new_tokens=budgets, adapters=adapters)
    for image, prompt, adapter, together in zip(images, prompts, adapters, batch):
        [alone] = adapted_engine.generate([image], [prompt], max_new_tokens=[BUDGET], adapters=[adapter])
        assert together.token_ids == alone.token_ids
        assert np.allclose(together.token_logprobs, alone.token_logprobs, atol=1e-4)
    # A base row through the adapted model answers as the plain base model does.
    for index in (0, 3):
        [plain] = segmenter.engine.generate([images[index]], [prompts[index]], max_new_tokens=[BUDGET])
        assert plain.token_ids == batch[index].token_ids


def test_adapters_change_the_answers(adapted_engine):
    [image] = pictures(1)
    prompt = parse_prompt("cat")
    texts = [adapted_engine.generate([image], [prompt], max_new_tokens=[BUDGET], adapters=[a])[0].text
             for a in (None, "acme/a", "acme/b.v2")]
    assert len(set(texts)) == 3, texts


def test_unknown_adapters_are_refused(adapted_engine, segmenter):
    [image] = pictures(1)
    with pytest.raises(ValueError, match="unknown adapters"):
        adapted_engine.generate([image], [parse_prompt("cat")], adapters=["acme/c"])
    with pytest.raises(ValueError, match="no adapters are attached"):
        segmenter.engine.generate([image], [parse_prompt("cat")], adapters=["acme/a"])


def test_the_pool_runs_base_and_adapter_requests_in_one_generate_call(adapted_engine, tiny_fixtures):
    calls = []
    generate = adapted_engine.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs.get("adapters"))
        return generate(*args, **kwargs)

    pool = ModelPool({"base": adapted_engine}, MaskDecoder.from_npz(tiny_fixtures / "vae-oid.npz"),
                     {"acme/a": "base", "acme/b.v2": "base"})
    models = ["base", "acme/a", "acme/b.v2", "acme/a", "acme/unknown"]
    images = pictures(len(models))
    requests = [PredictRequest(m, image, parse_prompt("cat"), BUDGET) for m, image in zip(models, images)]
    adapted_engine.generate = counting_generate
    try:
        outcomes = pool.predict(requests)
    finally:
        del adapted_engine.generate
    assert calls == [[None, "acme/a", "acme/b.v2", "acme/a"]]
    assert [o.status for o in outcomes] == [200, 200, 200, 200, 400]
    assert "served: base, acme/a, acme/b.v2" in outcomes[-1].error
    for request, outcome in zip(requests[:4], outcomes):
        [alone] = pool.predict([request])
        assert alone.prediction.text == outcome.prediction.text


def test_a_pool_refuses_an_adapter_not_attached_to_its_base(adapted_engine, tiny_fixtures):
    with pytest.raises(ValueError, match="not attached"):
        ModelPool({"base": adapted_engine}, MaskDecoder.from_npz(tiny_fixtures / "vae-oid.npz"), {"acme/c": "base"})


def test_the_graph_engine_serves_mixed_adapter_batches_as_the_fast_loop(adapted_engine, tiny_fixtures, lora_adapters):
    """Rows with adapters run the same fixed-shape step as base rows (stacked adapter weights, graph/lora.py;
    tests/model/test_graph_lora.py): every batch gives what the fast loop gives (which equals each row alone,
    above), and no step goes through PEFT's hooks."""
    from segmentation.model.graph.decoder import GraphSettings

    graph = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                            graph=GraphSettings(buckets=(1, 4, 8)))
    graph.attach_adapters({"acme/a": lora_adapters["a"], "acme/b.v2": lora_adapters["b"]})
    images = pictures(5)
    prompts = [parse_prompt(p) for p in ("cat", "dog ; car", "cat", "the man on the left", "bird")]
    budgets = [BUDGET] * len(prompts)
    for adapters in ([None, "acme/a", "acme/b.v2", None, "acme/a"], [None] * 5, ["acme/b.v2"] * 5):
        want = adapted_engine.generate(images, prompts, max_new_tokens=budgets, adapters=adapters)
        got = graph.generate(images, prompts, max_new_tokens=budgets, adapters=adapters)
        assert [g.token_ids for g in got] == [w.token_ids for w in want], adapters
        for g, w in zip(got, want):
            assert np.allclose(g.token_logprobs, w.token_logprobs, atol=1e-4)
    assert graph.steps["peft"] == 0 and graph.steps["fixed"] > 0
