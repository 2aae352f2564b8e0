"""LoRA adapters loaded and unloaded while the graph engine serves (GraphSettings.runtime_adapters): copied into
a free slot of the stacked weights reserved at start, in place; answering token for token as the same adapter
attached at start, every step on the fixed path; refused before anything changes when they do not fit; unloaded
while a request of theirs runs, which keeps its adapter to the end while new requests are refused."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from pictures import random_image

from segmentation.model.adapters import AdapterError
from segmentation.model.engine import PaliGemmaEngine
from segmentation.model.graph.decoder import GraphSettings
from segmentation.model.graph.lora import SlotRefused
from segmentation.model.prompts import parse_prompt
from segmentation.model.vae import MaskDecoder
from segmentation.serving.adapter_admin import AdminError
from segmentation.serving.pool import ModelPool, PredictRequest

SETTINGS = dict(buckets=(1, 2, 4), max_adapters=2, max_lora_rank=8)
# The tiny fixture's long request (tests/model/test_scheduler_stream.py): long enough to unload mid-flight.
LONG_IMAGE = (93, 70, 13)
LONG_PROMPT = parse_prompt("the man on the left", "segment")
LONG_BUDGET = 400


def runtime_engine(tiny_fixtures) -> PaliGemmaEngine:
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                             graph=GraphSettings(runtime_adapters=True, **SETTINGS))
    engine.attach_adapters({})
    return engine


@pytest.fixture(scope="module")
def attached(tiny_fixtures, lora_adapters) -> PaliGemmaEngine:
    """The reference: adapter a attached at start."""
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                             graph=GraphSettings(**SETTINGS))
    engine.attach_adapters({"acme/a": lora_adapters["a"]})
    return engine


@pytest.fixture(scope="module")
def odd_adapters(tiny_fixtures, lora_adapters, tmp_path_factory) -> dict:
    """Adapters the slots cannot take: rank 16 (the slots hold 8), the output layer (no stack), a tensor of
    the wrong width (another base's shapes)."""
    from lora import write_random_adapter
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("runtime-odd")
    base = tiny_fixtures / "paligemma"
    wide = out / "wide"
    shutil.copytree(lora_adapters["a"], wide)
    tensors = load_file(wide / "adapter_model.safetensors")
    key = next(k for k in tensors if "language_model.layers.0.self_attn.q_proj.lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)
    save_file(tensors, wide / "adapter_model.safetensors")
    return {
        "rank16": write_random_adapter(base, out / "rank16", seed=5, rank=16),
        "head": write_random_adapter(base, out / "head", seed=6, rank=2, target_modules=["q_proj", "lm_head"]),
        "wide": wide,
        "b": lora_adapters["b"],
    }


def requests(count: int):
    images = [random_image(70 + 9 * i, 60 + 5 * i, 40 + i) for i in range(count)]
    return images, [parse_prompt(p) for p in ("cat", "dog ; car", "bird", "tree")[:count]]


def test_a_loaded_adapter_answers_as_the_same_adapter_attached_at_start(tiny_fixtures, lora_adapters, attached):
    engine = runtime_engine(tiny_fixtures)
    images, prompts = requests(4)
    base_before = engine.generate(images, prompts)
    stack = engine.decoder.lora.stacks["model.language_model.layers.0.self_attn.q_proj"]
    pointers = (stack.a.data_ptr(), stack.b.data_ptr(), stack.scale.data_ptr())
    place = engine.load_adapter("acme/a", lora_adapters["a"], label="a")
    assert place["slot"] == 1 and place["rank"] == 4 and place["slot_rank"] == 8
    assert (stack.a.data_ptr(), stack.b.data_ptr(), stack.scale.data_ptr()) == pointers  # written in place
    adapters = ["acme/a", None, "acme/a", None]
    before = dict(engine.steps)
    loaded = engine.generate(images, prompts, adapters=adapters)
    reference = attached.generate(images, prompts, adapters=adapters)
    assert [g.token_ids for g in loaded] == [g.token_ids for g in reference]
    through_peft = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="fast")
    through_peft.attach_adapters({"acme/a": lora_adapters["a"]})  # PEFT's own per-row hooks
    assert [g.token_ids for g in loaded] == [g.token_ids for g in through_peft.generate(images, prompts,
                                                                                           adapters=adapters)]
    assert engine.steps["peft"] == before["peft"] and engine.steps["fixed"] > before["fixed"]
    assert loaded[0].token_ids != base_before[0].token_ids  # the adapter changes the answer
    assert [loaded[i].token_ids for i in (1, 3)] == [base_before[i].token_ids for i in (1, 3)]
    name = engine.retire_adapter("acme/a")
    engine.free_adapter(name)
    assert not stack.a.any() and not stack.scale.any()  # the slot is zeros again
    assert [g.token_ids for g in engine.generate(images, prompts)] == [g.token_ids for g in base_before]
    assert engine.slot_status()["free"] == 2


def test_adapters_that_do_not_fit_are_refused_before_anything_changes(tiny_fixtures, lora_adapters, odd_adapters):
    engine = runtime_engine(tiny_fixtures)
    engine.decoder  # noqa: B018 -- built and captured as at start
    peft_adapters = set(engine.model.peft_config)
    for name, words in (("rank16", "rank 16 exceeds the slot rank 8"), ("head", "lm_head"),
                        ("wide", "the base's layer needs [r, 64]")):
        with pytest.raises(AdapterError, match=words.replace("[", r"\[").replace("]", r"\]")):
            engine.load_adapter(f"acme/{name}", odd_adapters[name], label=name)
    assert set(engine.model.peft_config) == peft_adapters and engine.slot_status()["free"] == 2
    engine.load_adapter("acme/a", lora_adapters["a"], label="a")
    with pytest.raises(KeyError):
        engine.load_adapter("acme/a", lora_adapters["b"], label="b")
    engine.load_adapter("acme/b", odd_adapters["b"], label="b")
    with pytest.raises(SlotRefused) as full:
        engine.load_adapter("acme/c", lora_adapters["a"], label="c")
    assert full.value.full and "no free slot" in str(full.value)


def test_an_adapter_unloaded_mid_flight_keeps_its_running_request_and_refuses_new_ones(
        tiny_fixtures, lora_adapters, attached):
    engine = runtime_engine(tiny_fixtures)
    pool = ModelPool({"demo": engine}, MaskDecoder.from_npz(tiny_fixtures / "vae-oid.npz"))
    pool.warm_up()
    pool.start_schedulers()
    [alone] = attached.generate([random_image(*LONG_IMAGE)], [LONG_PROMPT], max_new_tokens=[LONG_BUDGET],
                                adapters=["acme/a"])
    assert len(alone.token_ids) > 60  # long enough to be unloaded while it runs

    async def scenario():
        await pool.load_adapter("acme/a", lora_adapters["a"], label="a", root="a")
        scheduler = pool.schedulers["demo"]
        long = asyncio.ensure_future(pool.predict_one(PredictRequest(
            "acme/a", random_image(*LONG_IMAGE), LONG_PROMPT, max_new_tokens=LONG_BUDGET)))
        while not scheduler.running:
            await asyncio.sleep(0.01)
        unload = asyncio.ensure_future(pool.unload_adapter("acme/a"))
        await asyncio.sleep(0.05)
        after = await pool.predict_one(PredictRequest("acme/a", random_image(60, 50, 1), parse_prompt("cat")))
        running_then = not long.done()
        outcome = await long
        await unload
        return after, running_then, outcome

    try:
        after, running_then, outcome = asyncio.run(scenario())
    finally:
        pool.close()
    assert running_then  # the refusal came while the long request still ran
    assert after.status == 404 and "unloaded" in after.error
    assert outcome.error is None and outcome.prediction.text == alone.text
    assert engine.slot_status()["free"] == 2 and "acme/a" not in pool.adapters
    assert engine.steps["peft"] == 0


def test_the_pool_answers_what_it_cannot_load_or_unload(tiny_fixtures, lora_adapters, odd_adapters):
    engine = runtime_engine(tiny_fixtures)
    pool = ModelPool({"demo": engine}, MaskDecoder.from_npz(tiny_fixtures / "vae-oid.npz"))

    async def refused(work) -> tuple[int, str]:
        with pytest.raises(AdminError) as caught:
            await work
        return caught.value.status, str(caught.value)

    async def scenario():
        assert (await refused(pool.unload_adapter("acme/none")))[0] == 404
        assert (await refused(pool.load_adapter("demo", lora_adapters["a"], label="a", root="a")))[0] == 409
        status, message = await refused(pool.load_adapter("x/r", odd_adapters["rank16"], label="r16", root="r16"))
        assert status == 400 and message.startswith("r16: rank 16")
        await pool.load_adapter("acme/a", lora_adapters["a"], label="a", root="a")
        await pool.load_adapter("acme/b", lora_adapters["b"], label="b", root="b")
        status, message = await refused(pool.load_adapter("acme/c", lora_adapters["a"], label="c", root="c"))
        assert status == 409 and "no free slot" in message
        assert (await refused(pool.load_adapter("acme/a", lora_adapters["a"], label="a", root="a")))[0] == 409
        await pool.unload_adapter("acme/a")
        await pool.load_adapter("acme/c", lora_adapters["a"], label="c", root="c")  # into the freed slot

    asyncio.run(scenario())
    described = {m["id"]: m for m in pool.describe()}
    assert described["demo"]["lora_slots"] == {"slots": 2, "slot_rank": 8, "free": 0, "runtime_adapters": True}
    assert described["acme/c"]["root"] == "c" and described["acme/c"]["graphs"]["lora"]["slot"] == 1
