"""The step scheduler when things fail (segmentation/model/graph/scheduler.py): every request is settled —
answered, or failed with a reason — and never left to hang until its timeout. Failures are injected
into the real scheduler on the tiny fixture: a device (CUDA) error in a step, a step that fails once,
one row that cannot be answered, a failing metrics hook, one request that fails the prefill of a group."""

from __future__ import annotations

import time

import pytest
from pictures import random_image

from segmentation.model.engine import PaliGemmaEngine
from segmentation.model.graph.decoder import GraphSettings
from segmentation.model.graph.scheduler import EngineBroken, StepScheduler, is_device_failure
from segmentation.model.prompts import parse_prompt

CUDA_ERROR = "CUDA error: an illegal memory access was encountered"


@pytest.fixture(scope="module")
def engine(tiny_fixtures):
    return PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                           graph=GraphSettings(buckets=(1, 2, 4), sync_every=2))


@pytest.fixture(scope="module")
def solo(engine):
    """Each request's answer alone (the graph engine's own whole-batch path)."""
    cache = {}

    def answer(seed: int, budget: int):
        if (seed, budget) not in cache:
            [cache[seed, budget]] = engine.generate([image(seed)], [parse_prompt("cat ; dog")], max_new_tokens=[budget])
        return cache[seed, budget]

    return answer


def image(seed: int):
    return random_image(70 + seed, 60, seed)


def submit(scheduler: StepScheduler, seed: int, budget: int = 30, **kwargs):
    return scheduler.submit(image(seed), parse_prompt("cat ; dog"), max_new_tokens=budget, **kwargs)


def settled_within(futures, seconds: float = 30.0) -> list:
    """Each future's result or exception: all must settle well before any request timeout."""
    deadline = time.monotonic() + seconds
    outcomes = []
    for future in futures:
        try:
            outcomes.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            raise AssertionError("a request was left hanging") from None
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            outcomes.append(exc)
    return outcomes


def failing_at(step, n: int, exc: Exception):
    """`step` (a decoder's run_step) that raises `exc` on its n-th call, and only then."""
    calls = {"n": 0}

    def run_step(batch, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return step(batch, **kwargs)

    return run_step


def test_what_counts_as_a_device_failure():
    import torch

    assert is_device_failure(RuntimeError(CUDA_ERROR))
    assert not is_device_failure(RuntimeError("shapes do not match"))
    assert not is_device_failure(torch.OutOfMemoryError("CUDA out of memory"))
    if hasattr(torch, "AcceleratorError"):
        assert is_device_failure(torch.AcceleratorError("device-side assert triggered"))


def test_a_device_error_settles_every_request_and_refuses_new_ones(engine, monkeypatch):
    broken = []
    scheduler = StepScheduler(engine, on_broken=broken.append)
    decoder = scheduler.decoder
    real_step = decoder.run_step
    monkeypatch.setattr(decoder, "run_step", failing_at(real_step, 6, RuntimeError(CUDA_ERROR)))
    try:
        # More requests than slots (4): some run when the device fails, the rest wait in the queue.
        futures = [submit(scheduler, seed, 200) for seed in range(7)]
        outcomes = settled_within(futures)
        assert all(isinstance(o, (RuntimeError, EngineBroken)) for o in outcomes), outcomes
        assert any(isinstance(o, EngineBroken) for o in outcomes)  # the waiting ones
        assert scheduler.broken and "restarted" in scheduler.broken and broken == [scheduler.broken]
        with pytest.raises(EngineBroken):
            submit(scheduler, 9)
        assert scheduler.running == 0 and scheduler.queued == 0
    finally:
        monkeypatch.setattr(decoder, "run_step", real_step)
        scheduler.close()
        decoder.reset()


def test_a_step_that_fails_once_fails_its_rows_and_the_queue_goes_on(engine, solo, monkeypatch):
    scheduler = StepScheduler(engine)
    decoder = scheduler.decoder
    monkeypatch.setattr(decoder, "run_step", failing_at(decoder.run_step, 3, RuntimeError("a failure of one step")))
    try:
        futures = [submit(scheduler, seed, 40) for seed in range(6)]
        outcomes = settled_within(futures)
        failed = [o for o in outcomes if isinstance(o, Exception)]
        assert failed and all("a failure of one step" in str(o) for o in failed)
        answered = [(seed, o) for seed, o in enumerate(outcomes) if not isinstance(o, Exception)]
        assert answered  # the requests still waiting when the step failed were served afterwards
        for seed, generation in answered:
            assert generation.token_ids == solo(seed, 40).token_ids
        assert scheduler.broken is None
        assert submit(scheduler, 8, 20).result(timeout=30).token_ids == solo(8, 20).token_ids
    finally:
        scheduler.close()


def test_one_row_that_cannot_be_answered_fails_alone(engine, solo, monkeypatch):
    scheduler = StepScheduler(engine)
    real_row = engine._row
    calls = {"n": 0}

    def row(ids, logprobs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return real_row(ids, logprobs)

    monkeypatch.setattr(engine, "_row", row)
    try:
        # Three equal requests admitted together: their rows end at the same step and are delivered in one
        # go; the first of them cannot be answered.
        with scheduler._wake:
            futures = [submit(scheduler, 2, 30) for _ in range(3)]
        outcomes = settled_within(futures)
        assert sum(isinstance(o, UnicodeDecodeError) for o in outcomes) == 1
        answered = [o for o in outcomes if not isinstance(o, Exception)]
        assert len(answered) == 2 and all(o.token_ids == solo(2, 30).token_ids for o in answered)
    finally:
        monkeypatch.setattr(engine, "_row", real_row)
        scheduler.close()


def test_a_failing_metrics_hook_never_stops_an_answer(engine, solo):
    def hook(job, generation):
        raise ValueError("a metrics backend that fails")

    scheduler = StepScheduler(engine, on_finish=hook)
    try:
        outcomes = settled_within([submit(scheduler, seed, 25) for seed in range(3)])
        assert [o.token_ids for o in outcomes] == [solo(seed, 25).token_ids for seed in range(3)]
    finally:
        scheduler.close()


def test_one_request_that_fails_the_prefill_fails_alone(engine, solo, monkeypatch):
    scheduler = StepScheduler(engine)
    decoder = scheduler.decoder
    real_prefill = decoder.prefill
    poisoned = image(5).size

    def prefill(slots, inputs, specs, **kwargs):
        # Stands for a prefill that runs out of memory only with the big request in the group.
        if poisoned in sizes[0]:
            raise RuntimeError("prefill failed")
        return real_prefill(slots, inputs, specs, **kwargs)

    sizes = [[]]
    real_prepare = engine.prepare

    def prepare(images, prompts):
        sizes[0] = [i.size for i in images]
        return real_prepare(images, prompts)

    monkeypatch.setattr(decoder, "prefill", prefill)
    monkeypatch.setattr(engine, "prepare", prepare)
    try:
        with scheduler._wake:  # queue all three before the loop looks: they are admitted as one group
            futures = [submit(scheduler, seed, 30) for seed in (4, 5, 6)]
        outcomes = settled_within(futures)
        assert isinstance(outcomes[1], RuntimeError) and "prefill failed" in str(outcomes[1])
        assert outcomes[0].token_ids == solo(4, 30).token_ids and outcomes[2].token_ids == solo(6, 30).token_ids
        assert scheduler.broken is None
    finally:
        monkeypatch.setattr(engine, "prepare", real_prepare)
        scheduler.close()
