"""LoRA rows inside the graph engine's fixed-shape step (segmentation/model/graph/lora.py): adapters of other
ranks and target modules stacked in static slots, mixed base/adapter batches equal to each row alone through
PEFT token for token in float32, every step on the one fixed-shape step (`fixed` here, `graph` on a GPU: never
`peft`), no host synchronisation in it, and PEFT's hooks only for adapters the slots cannot hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pictures import random_image
from test_graph_step import HostSyncGuard

from segmentation.model.engine import PaliGemmaEngine
from segmentation.model.graph.decoder import GraphSettings
from segmentation.model.graph.scheduler import StepScheduler
from segmentation.model.prompts import parse_prompt
from segmentation.model.vae import MaskDecoder
from segmentation.serving.pool import ModelPool

BUDGET = 36
PROMPTS = ("cat", "dog ; car", "the man on the left", "bird", "car ; bus ; person", "tree")


@pytest.fixture(scope="module")
def adapters(tiny_fixtures, lora_adapters, tmp_path_factory) -> dict[str, object]:
    """a, b: rank 4 on every projection of both towers; c: rank 2 on q and v only; d: rank 8 on the MLPs and the
    output layer."""
    from lora import write_random_adapter

    out = tmp_path_factory.mktemp("graph-lora")
    base = tiny_fixtures / "paligemma"
    return {
        "acme/a": lora_adapters["a"], "acme/b": lora_adapters["b"],
        "acme/c": write_random_adapter(base, out / "c", seed=3, rank=2, target_modules=["q_proj", "v_proj"]),
        "acme/d": write_random_adapter(base, out / "d", seed=4, rank=8,
                                       target_modules=["gate_proj", "up_proj", "down_proj", "fc1", "lm_head"]),
    }


def load(tiny_fixtures, adapters, **settings) -> PaliGemmaEngine:
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                             graph=GraphSettings(buckets=(1, 2, 4, 8), **settings))
    engine.attach_adapters(adapters)
    return engine


@pytest.fixture(scope="module")
def graph(tiny_fixtures, adapters) -> PaliGemmaEngine:
    return load(tiny_fixtures, adapters)


@pytest.fixture(scope="module")
def peft(tiny_fixtures, adapters) -> PaliGemmaEngine:
    """The reference: the `fast` loop, whose adapter rows go through PEFT's per-row hooks."""
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="fast")
    engine.attach_adapters(adapters)
    return engine


def batch(count: int, seed: int = 0):
    images = [random_image(70 + 7 * i, 60 + 3 * i, seed + i) for i in range(count)]
    return images, [parse_prompt(PROMPTS[(seed + i) % len(PROMPTS)]) for i in range(count)]


def steps_since(engine, before: dict) -> dict:
    return {path: n - before[path] for path, n in engine.steps.items() if n != before[path]}


def test_adapters_of_other_ranks_and_modules_are_stacked_in_slots(graph):
    lora = graph.decoder.lora
    assert lora.refused == {}
    names = graph.adapters
    assert [lora.slot_of[names[a]] for a in ("acme/a", "acme/b", "acme/c", "acme/d")] == [1, 2, 3, 4]
    assert lora.ranks[names["acme/c"]] == 2 and lora.ranks[names["acme/d"]] == 8
    assert lora.targets[names["acme/c"]] == ["q_proj", "v_proj"]
    stack = lora.stacks["model.language_model.layers.0.self_attn.q_proj"]
    assert (lora.slot_count, lora.rank) == (4, 8)  # the attached adapters and their highest rank
    assert stack.a.shape == (5 * 8, 64)  # every slot at the slot rank, slot 0 included
    assert not stack.a[: lora.rank].any() and not stack.scale[0]  # slot 0: the base rows' zeros
    assert not stack.a[4 * lora.rank:5 * lora.rank].any()  # d does not adapt q_proj: its slot stays zero
    assert "lm_head" in lora.stacks and lora.targets[names["acme/d"]][-1] == "up_proj"
    assert graph.adapter_status("acme/c") == {"slot": 3, "rank": 2, "slot_rank": lora.rank,
                                              "modules": ["q_proj", "v_proj"]}


def test_reserved_slots_are_the_caps_and_serve_the_same(tiny_fixtures, adapters, graph):
    """`reserve=True` allocates SEG_MAX_ADAPTERS slots of rank SEG_MAX_LORA_RANK (room to load adapters into);
    the updates, and so the answers, are those of the stacks sized to the attached adapters."""
    from segmentation.model.graph.lora import LoraSlots

    engine = load(tiny_fixtures, adapters)
    decoder = engine.decoder
    sized = decoder.lora
    reserved = LoraSlots(decoder.lora_modules(), list(engine.adapters.values()), max_adapters=6, max_rank=16,
                         reserve=True)
    assert (reserved.slot_count, reserved.rank) == (6, 16) and reserved.slot_of == sized.slot_of
    name = "model.language_model.layers.1.mlp.up_proj"
    assert reserved.stacks[name].a.shape == (7 * 16, 64)
    torch.manual_seed(1)
    x = torch.randn(4, 2, 64)
    slot = torch.tensor([0, 1, 3, 4])
    with torch.inference_mode():
        want = sized.stacks[name].delta(x, sized.onehot[slot], sized.stacks[name].scale[slot])
        got = reserved.stacks[name].delta(x, reserved.onehot[slot], reserved.stacks[name].scale[slot])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_stacked_update_is_peft_s(graph):
    """One layer: the update through the stacks equals PEFT's `lora_B(lora_A(x)) * scaling` of each row's
    adapter, and is exactly zero on base rows."""
    decoder = graph.decoder
    module = decoder.model.model.language_model.layers[1].mlp.down_proj
    stack = decoder._stacks[id(module)]
    torch.manual_seed(0)
    x = torch.randn(5, 3, module.base_layer.in_features)
    names = [graph.adapters[a] for a in ("acme/a", "acme/d", "acme/b")] + ["__base__", graph.adapters["acme/c"]]
    slot = torch.tensor(decoder.lora.slots(names))
    with torch.inference_mode():
        got = stack.delta(x, decoder.lora.onehot[slot], stack.scale[slot])
    for row, name in enumerate(names):
        if name == "__base__" or name not in module.lora_A:
            assert torch.equal(got[row], torch.zeros_like(got[row]))
            continue
        want = module.lora_B[name](module.lora_A[name](x[row])) * module.scaling[name]
        torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mix", [
    [None, "acme/a", "acme/b", None, "acme/c", "acme/d"],
    ["acme/d", "acme/c", "acme/a"],
    ["acme/b"] * 5,
    [None] * 3,
])
def test_mixed_batches_equal_each_row_alone_through_peft(graph, peft, mix):
    images, prompts = batch(len(mix), seed=len(mix))
    budgets = [BUDGET] * len(mix)
    before = dict(graph.steps)
    together = graph.generate(images, prompts, max_new_tokens=budgets, adapters=mix)
    assert set(steps_since(graph, before)) == {"fixed"}  # the one fixed-shape step: never `peft`
    for image, prompt, adapter, got in zip(images, prompts, mix, together):
        [alone] = peft.generate([image], [prompt], max_new_tokens=[BUDGET], adapters=[adapter])
        assert got.token_ids == alone.token_ids, adapter
        np.testing.assert_allclose(got.token_logprobs, alone.token_logprobs, atol=1e-4)
    if len(set(mix)) > 1:  # the adapters did change the answers of this batch
        assert len({tuple(g.token_ids) for g in together}) > 1


def test_one_fixed_shape_step_serves_base_and_mixed_batches(tiny_fixtures, adapters):
    """Compiled, the step is traced once per bucket whatever the rows' adapters; stepping rows with adapters
    never synchronises with the host."""
    from torch._dynamo.testing import CompileCounter

    engine = load(tiny_fixtures, adapters)
    decoder = engine.decoder
    counter = CompileCounter()
    decoder._step_fn = torch.compile(decoder._step, backend=counter, fullgraph=True, dynamic=False)
    decoder.fixed_span = True
    torch._dynamo.reset()
    images, prompts = batch(4, seed=2)
    for mix in ([None] * 4, [None, "acme/a", "acme/c", "acme/d"], ["acme/b", None, "acme/a", None]):
        engine.generate(images, prompts, max_new_tokens=[BUDGET] * 4, adapters=mix)
    assert counter.frame_count == 1
    assert engine.steps["peft"] == 0 and engine.steps["fixed"] > 20
    decoder._step_fn = decoder._step
    with HostSyncGuard() as guard:
        for _ in range(5):
            decoder.run_step(4)
    assert guard.calls == []


def test_adapters_without_a_slot_step_through_peft(tiny_fixtures, adapters, peft):
    """Rank 4 above a slot rank of 2, and a second adapter with one slot: refused with the reason, their rows
    stepped through PEFT's hooks (`peft`), with the same answers; the stacked one still runs in the step."""
    engine = load(tiny_fixtures, adapters, max_lora_rank=2, max_adapters=1)
    lora = engine.decoder.lora
    names = engine.adapters
    assert lora.slot_of == {names["acme/c"]: 1}
    assert "rank 4 exceeds the slot rank" in lora.refused[names["acme/a"]]
    assert "rank 8" in lora.refused[names["acme/d"]]
    images, prompts = batch(3, seed=5)
    for mix, path in (([None, "acme/c", None], "fixed"), (["acme/c", "acme/a", None], "peft")):
        before = dict(engine.steps)
        got = engine.generate(images, prompts, max_new_tokens=[BUDGET] * 3, adapters=mix)
        assert set(steps_since(engine, before)) == {path}
        want = peft.generate(images, prompts, max_new_tokens=[BUDGET] * 3, adapters=mix)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
    pool = ModelPool({"base": engine}, MaskDecoder.from_npz(tiny_fixtures / "vae-oid.npz"),
                     {a: "base" for a in adapters})
    described = {m["id"]: m["graphs"] for m in pool.describe()}
    assert described["acme/c"]["lora"]["slot"] == 1 and "PEFT" not in described["acme/c"].get("why", "")
    assert described["acme/a"]["lora"]["slot"] is None and "PEFT" in described["acme/a"]["why"]


def test_scheduled_rows_of_several_adapters_answer_as_alone(tiny_fixtures, adapters, peft):
    """Requests for the base and four adapters joining and leaving a running batch of 4 slots: each equals its
    answer alone through PEFT; no step left the fixed-shape step."""
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                             graph=GraphSettings(buckets=(1, 2, 4), sync_every=2))
    engine.attach_adapters(adapters)
    scheduler = StepScheduler(engine)
    mix = [None, "acme/a", "acme/c", "acme/d", "acme/b", None, "acme/d", "acme/a"]
    budgets = [30, 12, 40, 20, 8, 25, 33, 16]
    images, prompts = batch(len(mix), seed=9)
    try:
        futures = [scheduler.submit(i, p, max_new_tokens=b, adapter=a)
                   for i, p, b, a in zip(images, prompts, budgets, mix)]
        results = [f.result(timeout=300) for f in futures]
    finally:
        scheduler.close()
    assert scheduler.stats.admitted == len(mix) and engine.steps["peft"] == 0
    for image, prompt, budget, adapter, got in zip(images, prompts, budgets, mix, results):
        [alone] = peft.generate([image], [prompt], max_new_tokens=[budget], adapters=[adapter])
        assert got.token_ids == alone.token_ids, adapter
