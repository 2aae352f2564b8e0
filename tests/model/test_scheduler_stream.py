"""What the step scheduler hands out while a row decodes (`on_tokens`) and how a cut ends a row
(`cut_after`, OpenAI's max_tokens): the streamed tokens are the answer's own, a cut answer is the uncut
one's beginning, and the engine reports prompt tokens and finish reasons on every path."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from pictures import random_image

from segmentation.model.engine import PaliGemmaEngine
from segmentation.model.graph.decoder import GraphSettings
from segmentation.model.graph.scheduler import StepScheduler
from segmentation.model.prompts import parse_prompt

# A request whose answer is long with the tiny fixture (169 tokens: tests/model/test_scheduler.py's LONG).
LONG_IMAGE = (93, 70, 13)
LONG_PROMPT = parse_prompt("the man on the left", "segment")
LONG_BUDGET = 400
LONG_TOKENS = 169


@pytest.fixture(scope="module")
def engine(tiny_fixtures):
    return PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                           graph=GraphSettings(buckets=(1, 2, 4), sync_every=3))


@pytest.fixture(scope="module")
def scheduler(engine):
    finished = []
    scheduler = StepScheduler(engine, on_finish=lambda job, generation: finished.append(job))
    scheduler.finished_jobs = finished
    yield scheduler
    scheduler.close()


@pytest.fixture(scope="module")
def alone(engine):
    """The long request's whole answer, generated alone (no scheduler)."""
    [generation] = engine.generate([random_image(*LONG_IMAGE)], [LONG_PROMPT], max_new_tokens=[LONG_BUDGET])
    assert len(generation.token_ids) == LONG_TOKENS  # long enough for the cuts and groups below to mean something
    return generation


def test_streamed_tokens_are_the_answer_in_order(scheduler, alone):
    calls: list[tuple[list[int], list[float], str]] = []
    future = scheduler.submit(random_image(*LONG_IMAGE), LONG_PROMPT, max_new_tokens=LONG_BUDGET,
                              on_tokens=lambda ids, lps: calls.append((ids, lps, threading.current_thread().name)))
    generation = future.result(timeout=120)
    assert generation.token_ids == alone.token_ids
    streamed = [t for ids, _, _ in calls for t in ids]
    logprobs = [v for _, lps, _ in calls for v in lps]
    # Every group of 3 steps handed out its tokens: many calls, each a few tokens, all before the end.
    assert len(calls) >= len(alone.token_ids) // 3 - 2
    assert all(1 <= len(ids) <= 4 for ids, _, _ in calls)
    assert streamed == alone.token_ids[:len(streamed)] and len(streamed) >= len(alone.token_ids) - 4
    np.testing.assert_allclose(logprobs, alone.token_logprobs[:len(logprobs)], atol=1e-4)
    assert all(name != threading.current_thread().name for _, _, name in calls)  # the scheduler's thread


def test_a_cut_row_leaves_after_its_cut_with_the_answer_s_beginning(engine, scheduler, alone):
    before = len(scheduler.finished_jobs)
    generation = scheduler.submit(random_image(*LONG_IMAGE), LONG_PROMPT, max_new_tokens=LONG_BUDGET,
                                  cut_after=10).result(timeout=60)
    [job] = scheduler.finished_jobs[before:]
    assert job.steps < 10 + 3  # it left at its cut (the group of 3 steps it was in), not after LONG_TOKENS steps
    assert generation.token_ids == alone.token_ids[:len(generation.token_ids)]
    assert len(generation.token_ids) > 10  # the token after the cut is known: the answer went on
    cut = engine.conclude(generation, budget=LONG_BUDGET, cut_after=10)
    assert cut.finish_reason == "length" and cut.token_ids == alone.token_ids[:10]
    assert cut.text == engine.text_of(alone.token_ids[:10]) and alone.text.startswith(cut.text)
    assert cut.prompt_tokens == generation.prompt_tokens > 256


def test_streaming_never_passes_the_cut(scheduler, alone):
    calls: list[list[int]] = []
    generation = scheduler.submit(random_image(*LONG_IMAGE), LONG_PROMPT, max_new_tokens=LONG_BUDGET, cut_after=7,
                                  on_tokens=lambda ids, lps: calls.append(ids)).result(timeout=60)
    streamed = [t for ids in calls for t in ids]
    assert streamed == alone.token_ids[:len(streamed)] and len(streamed) <= 7
    assert generation.token_ids[:7] == alone.token_ids[:7]


def test_an_answer_shorter_than_its_cut_stops_whole(engine, scheduler):
    short = parse_prompt("cat", "segment")
    [whole] = engine.generate([random_image(60, 50, 2)], [short], max_new_tokens=[30])
    generation = scheduler.submit(random_image(60, 50, 2), short, max_new_tokens=30, cut_after=200).result(timeout=60)
    concluded = engine.conclude(generation, budget=30, cut_after=200)
    assert concluded.token_ids == whole.token_ids
    assert concluded.finish_reason == ("length" if len(whole.token_ids) >= 30 else "stop")


def test_prompt_tokens_count_the_image_and_the_prompt(engine, scheduler):
    image, prompt = random_image(70, 40, 5), parse_prompt("the man on the left ; dog", "segment")
    inputs = engine.prepare([image], [prompt])
    want = int(inputs["attention_mask"].sum())
    # <image> x 256, <bos>, the prompt and its "\n" (PaliGemmaProcessor's layout)
    text_tokens = len(engine.tokenizer(prompt.text + "\n", add_special_tokens=False).input_ids)
    assert want == engine.processor.image_seq_length + 1 + text_tokens
    batched, _ = engine.generate([image, random_image(50, 50, 6)], [prompt, parse_prompt("cat")],
                                  max_new_tokens=[12, 40])
    scheduled = scheduler.submit(image, prompt, max_new_tokens=12).result(timeout=60)
    assert batched.prompt_tokens == scheduled.prompt_tokens == want
