"""Loud fallbacks of the graph engine, on the CPU: every decode step counted by the path it took, a failed
CUDA graph capture logged once per bucket and stepping eagerly with the same answers (or, required,
refusing with its reason), and graphs never replayed under another batch-invariant mode.

On a CPU `torch.cuda.CUDAGraph` cannot exist: forcing `use_graphs=True` makes every capture fail for
real (torch's own error), which is what a GPU whose capture fails looks like to the engine.
"""

from __future__ import annotations

import logging

import pytest
from pictures import random_image

from segmentation.model import invariant
from segmentation.model.engine import PaliGemmaEngine
from segmentation.model.graph.decoder import STEP_PATHS, GraphCaptureError, GraphSettings
from segmentation.model.prompts import parse_prompt


def requests(count: int = 3):
    texts = (("cat ; dog", "segment"), ("car", "detect"), ("the man on the left", "segment"))
    return ([random_image(70 + 5 * i, 60, i) for i in range(count)],
            [parse_prompt(*texts[i % 3]) for i in range(count)], [12, 30, 20][:count])


@pytest.fixture(scope="module")
def fast(tiny_fixtures):
    return PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="fast")


def test_a_failed_capture_is_logged_once_per_bucket_and_steps_eagerly(tiny_fixtures, fast, caplog):
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                             graph=GraphSettings(buckets=(1, 2, 4), use_graphs=True))
    with caplog.at_level(logging.ERROR, logger="segmentation.model.graph.decoder"):
        decoder = engine.decoder
        images, prompts, budgets = requests()
        got = engine.generate(images, prompts, max_new_tokens=budgets)
        engine.generate(images[:1], prompts[:1], max_new_tokens=budgets[:1])
    failures = [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
    assert len(failures) == 3 and [f"bucket {b}:" in m for b, m in zip((4, 2, 1), failures)] == [True] * 3
    assert decoder.graphs == {} and sorted(decoder.capture_failures) == [1, 2, 4]
    reason = decoder.capture_failures[4]
    assert reason and reason in failures[0]  # torch's own error, as it was raised
    # Correct all the same: the fixed-shape step, run eagerly for every bucket, answers as the fast loop.
    want = fast.generate(images, prompts, max_new_tokens=budgets)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert decoder.steps["graph"] == 0 and decoder.steps["fixed"] > 0
    status = engine.graph_status()
    assert status["captured"] is False and status["buckets"] == [] and status["eager_buckets"] == [1, 2, 4]
    assert status["failures"] == {"1": reason, "2": reason, "4": reason} and "capture failed" in status["why"]


def test_required_graphs_refuse_to_start_with_the_reason(tiny_fixtures):
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                             graph=GraphSettings(buckets=(1, 2), require=True))
    with pytest.raises(GraphCaptureError, match=r"SEG_REQUIRE_GRAPHS.*bucket 1: .+; bucket 2: .+"):
        engine.decoder  # noqa: B018


def test_every_step_is_counted_by_its_path(tiny_fixtures, fast):
    images, prompts, budgets = requests()
    heard = []
    engines = {
        "fast": fast,
        "hf-generate": PaliGemmaEngine(fast.model, fast.processor, generation="hf-generate"),
        "fixed": PaliGemmaEngine(fast.model, fast.processor, generation="graph", graph=GraphSettings(buckets=(1, 4))),
    }
    for path, engine in engines.items():
        engine.step_listeners.append(lambda p, n: heard.append((p, n)))
        before = dict(engine.steps)
        generations = engine.generate(images, prompts, max_new_tokens=budgets)
        counted = {p: engine.steps[p] - before[p] for p in STEP_PATHS if engine.steps[p] != before[p]}
        longest = max(len(g.token_ids) for g in generations)
        assert set(counted) == {path}, (path, counted)
        # One step per token after the prefill's, up to the longest row (its end token included).
        assert longest - 1 <= counted[path] <= max(budgets), (path, counted, longest)
    assert {p for p, _ in heard} == set(engines)
    assert sum(n for p, n in heard if p == "fixed") == engines["fixed"].steps["fixed"]


def test_rows_with_an_adapter_step_on_the_fixed_path_and_without_a_slot_as_peft(tiny_fixtures, lora_adapters):
    """An adapter with a slot in the stacked weights runs in the base's step (`fixed`, `graph` on a GPU); one
    without (its rank 4 above a slot rank of 2) sends its batch through PEFT's hooks, counted `peft`."""
    images, prompts, budgets = requests(2)
    for max_rank, path in ((16, "fixed"), (2, "peft")):
        engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                                 graph=GraphSettings(buckets=(1, 2), max_lora_rank=max_rank))
        engine.attach_adapters({"acme/a": lora_adapters["a"]})
        engine.generate(images, prompts, max_new_tokens=budgets, adapters=["acme/a", None])
        assert engine.steps[path] > 0 and sum(engine.steps.values()) == engine.steps[path], engine.steps
        engine.generate(images, prompts, max_new_tokens=budgets)  # base rows only: the base model's step
        assert engine.steps["fixed"] > 0


class Replay:
    """Stands in for a captured torch.cuda.CUDAGraph (none can exist on a CPU): counts its replays."""

    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


def test_graphs_are_never_replayed_under_another_batch_invariant_mode(tiny_fixtures, monkeypatch, caplog):
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                             graph=GraphSettings(buckets=(1, 2), use_graphs=True))
    decoder = engine.decoder  # every capture failed (CPU); one stand-in graph, captured with the mode off
    graph = decoder.graphs[2] = Replay()
    decoder.graph_mode = frozenset()
    decoder.run_step(2)
    assert graph.replays == 1 and decoder.steps["graph"] == 1
    monkeypatch.setattr(invariant, "enabled_kinds", lambda: frozenset({"cuda"}))  # the mode turned on
    with caplog.at_level(logging.WARNING, logger="segmentation.model.graph.decoder"):
        decoder.run_step(2)
        decoder.run_step(2)
    assert graph.replays == 1 and decoder.steps["fixed"] == 2  # stepped eagerly instead
    assert len([r for r in caplog.records if "mode changed" in r.getMessage()]) == 1
    # The engine captures again at its next use, under the mode now on.
    assert engine.decoder is decoder and decoder.graph_mode == frozenset({"cuda"})
    assert 2 not in decoder.graphs and sorted(decoder.capture_failures) == [1, 2]  # (the CPU cannot capture)


def test_models_entry_says_whether_graphs_are_captured(tiny_fixtures, fast):
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                             graph=GraphSettings(buckets=(1, 2)))
    assert engine.graph_status() == {"engine": "graph", "built": False, "captured": False, "buckets": [],
                                     "eager_buckets": [1, 2], "failures": {}}
    engine.decoder  # noqa: B018 -- built: on a CPU no graphs, by design
    status = engine.graph_status()
    assert status["built"] and not status["captured"] and status["eager_buckets"] == [1, 2]
    assert status["why"].startswith("no CUDA graphs on cpu")
    assert fast.graph_status()["why"] == "the fast engine has no decode graphs"
