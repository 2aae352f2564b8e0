"""Step-level batching (segmentation/model/graph/scheduler.py) on the tiny fixture: rows that join a
running batch mid-way and leave early answer exactly as each request alone; cancelled and late requests
free their slots; nothing is lost or answered twice under load."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np
import pytest
from pictures import random_image

from segmentation.model.engine import PaliGemmaEngine
from segmentation.model.graph.decoder import GraphSettings
from segmentation.model.graph.scheduler import StepScheduler
from segmentation.model.prompts import parse_prompt

PROMPTS = [("cat", "segment"), ("dog ; cat", "detect"), ("the man on the left", "segment"),
           ("car ; bus ; person ; bird", "detect"), ("tree ; sky", "segment"), ("bird", "detect")]

# A request whose answer alone is long (169 tokens with the tiny fixture, seed 0): it holds its slot for
# that many steps unless it is dropped.
LONG = (13, 2, 400)
LONG_STEPS = 169


@pytest.fixture(scope="module")
def engine(tiny_fixtures):
    # Two steps between looks at the rows: joins and leaves happen often.
    return PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                           graph=GraphSettings(buckets=(1, 2, 4), sync_every=2))


@pytest.fixture(scope="module")
def solo(tiny_fixtures):
    """The reference: each request alone through the fast loop."""
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="fast")
    cache = {}

    def answer(image_seed, prompt_index, budget=None):
        key = (image_seed, prompt_index, budget)
        if key not in cache:
            text, task = PROMPTS[prompt_index]
            [cache[key]] = engine.generate([random_image(80 + image_seed, 70, image_seed)], [parse_prompt(text, task)],
                                           max_new_tokens=None if budget is None else [budget])
        return cache[key]

    return answer


def submit(scheduler, image_seed, prompt_index, budget=None, **kwargs):
    text, task = PROMPTS[prompt_index]
    return scheduler.submit(random_image(80 + image_seed, 70, image_seed), parse_prompt(text, task),
                            max_new_tokens=budget, **kwargs)


def wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_rows_that_join_and_leave_mid_batch_answer_as_alone(engine, solo):
    scheduler = StepScheduler(engine)
    try:
        budgets = [60, 12, 45, 30, 8, 50, 20]
        first = [submit(scheduler, 0, 0, budgets[0]), submit(scheduler, 1, 1, budgets[1])]
        wait_until(lambda: scheduler.stats.steps >= 4)  # the first two are running
        later = []
        for i in range(2, len(budgets)):
            later.append(submit(scheduler, i, i % len(PROMPTS), budgets[i]))
            time.sleep(0.01 * i)
        futures = first + later
        results = [f.result(timeout=120) for f in futures]
        for i, got in enumerate(results):
            want = solo(i, i % len(PROMPTS), budgets[i])
            assert got.token_ids == want.token_ids, i
            np.testing.assert_allclose(got.token_logprobs, want.token_logprobs, atol=1e-4)
        assert scheduler.stats.admitted == len(budgets) and scheduler.stats.completed == len(budgets)
        # More requests than slots ran: some had to wait for rows to leave, and joined a running batch.
        assert scheduler.stats.admitted > scheduler.slots
        assert scheduler.running == 0 and scheduler.queued == 0
    finally:
        scheduler.close()


def test_the_long_request_is_long(solo):
    assert len(solo(*LONG).token_ids) == LONG_STEPS


def test_a_cancelled_request_frees_its_slot(engine, solo):
    scheduler = StepScheduler(engine)
    try:
        gone = submit(scheduler, *LONG)  # it would hold its slot for LONG_STEPS steps
        wait_until(lambda: scheduler.running == 1)
        assert gone.cancel()  # the client went away
        wait_until(lambda: scheduler.running == 0)
        assert scheduler.stats.dropped == 1
        steps = scheduler.stats.steps
        assert steps < LONG_STEPS - 20
        answer = submit(scheduler, 2, 2, 30).result(timeout=60)
        assert answer.token_ids == solo(2, 2, 30).token_ids
        with pytest.raises(concurrent.futures.CancelledError):
            gone.result()
    finally:
        scheduler.close()


def test_a_request_past_its_deadline_is_dropped(engine):
    scheduler = StepScheduler(engine)
    try:
        late = submit(scheduler, *LONG, timeout_s=0.05)  # LONG_STEPS steps take far longer than 0.05 s
        with pytest.raises(TimeoutError, match="ran out of time"):
            late.result(timeout=60)
        wait_until(lambda: scheduler.running == 0)
    finally:
        scheduler.close()


def test_sixteen_clients_none_lost_none_twice(engine, solo):
    """16 threads each send 3 mixed requests (1 to 4 classes) at once: every future gets exactly its own answer."""
    scheduler = StepScheduler(engine)
    answers: dict[tuple[int, int], list] = {}
    lock = threading.Lock()

    def client(number):
        for k in range(3):
            image_seed, prompt_index = number % 5, (number + k) % len(PROMPTS)
            future = submit(scheduler, image_seed, prompt_index, 24)
            generation = future.result(timeout=300)
            with lock:
                answers.setdefault((number, k), []).append((image_seed, prompt_index, generation))

    try:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        assert sorted(answers) == [(n, k) for n in range(16) for k in range(3)]
        for entries in answers.values():
            assert len(entries) == 1
            image_seed, prompt_index, generation = entries[0]
            assert generation.token_ids == solo(image_seed, prompt_index, 24).token_ids
        assert scheduler.stats.completed == 48 and scheduler.stats.failed == 0
    finally:
        scheduler.close()


def test_closing_fails_what_is_left(engine):
    scheduler = StepScheduler(engine)
    futures = [submit(scheduler, 20 + i, 3, 400) for i in range(6)]
    wait_until(lambda: scheduler.running > 0)
    scheduler.close()
    for future in futures:
        with pytest.raises(RuntimeError, match="closed"):
            future.result(timeout=10)
    with pytest.raises(RuntimeError, match="closed"):
        submit(scheduler, 0, 0)


def test_a_prompt_longer_than_the_cache_runs_the_fast_loop_alone(tiny_fixtures, solo):
    """A prompt past the graph cache's room is answered by the fast loop (the same tokens), beside rows
    that do fit and keep their slots."""
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph",
                                             graph=GraphSettings(buckets=(1, 2), prompt_tokens=8))
    scheduler = StepScheduler(engine)
    try:
        long_prompt = parse_prompt("car ; bus ; person ; bird ; tree ; sky")  # more than 8 text tokens
        short = submit(scheduler, 0, 0, 30)
        long = scheduler.submit(random_image(90, 70, 30), long_prompt, max_new_tokens=30)
        want = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="fast").generate(
            [random_image(90, 70, 30)], [long_prompt], max_new_tokens=[30])[0]
        assert long.result(timeout=120).token_ids == want.token_ids
        assert short.result(timeout=120).token_ids == solo(0, 0, 30).token_ids
    finally:
        scheduler.close()


def test_rows_move_down_into_freed_slots(engine, solo):
    """When a low slot frees up, the highest row moves into it (keys, state, outputs): steps then run
    fewer rows, and the moved row still answers as alone."""
    scheduler = StepScheduler(engine)
    try:
        seen = []  # (rows that stepped, rows computed) per group of steps
        scheduler.on_step = lambda s, rows: rows and seen.append((rows, s.last_batch))
        short = submit(scheduler, 0, 1, 6)  # slot 0, ends after a few steps
        long = [submit(scheduler, i, i % len(PROMPTS), 60) for i in (1, 2, 3)]  # slots 1-3
        assert short.result(timeout=60).token_ids == solo(0, 1, 6).token_ids
        for i, future in zip((1, 2, 3), long):
            assert future.result(timeout=120).token_ids == solo(i, i % len(PROMPTS), 60).token_ids
        # Every group of steps computed its rows only, also after the first row left slot 0.
        assert all(rows == computed for rows, computed in seen), seen
        assert (4, 4) in seen and any(rows in (2, 3) for rows, _ in seen[seen.index((4, 4)):])
    finally:
        scheduler.close()


@pytest.mark.parametrize("fixed_batch", [False, True], ids=["this CPU's arrangement", "fixed batch"])
def test_isolated_bfloat16_rows_that_join_and_leave_are_the_same_bits_as_alone(tiny_fixtures, fixed_batch, monkeypatch):
    """SEG_DTYPE=bfloat16 on the CPU (rows isolated: tests/model/test_row_isolation_cpu.py): running batches
    of 1 to 8 rows, rows joining mid-way and leaving early, answer bit for bit as each request alone, with
    either arrangement (`fixed batch` forced: what a CPU whose kernels depend on the batch size runs)."""
    if fixed_batch:
        from segmentation.model.graph.decoder import StaticDecoder

        real = StaticDecoder.row_arithmetic
        monkeypatch.setattr(StaticDecoder, "row_arithmetic",
                            lambda self, seed=0: {**real(self, seed), "any_batch": False, "fixed_batch": True})
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma", generation="graph", dtype="bfloat16",
                                             graph=GraphSettings(buckets=(1, 2, 4, 8), sync_every=2),
                                             max_new_tokens=48)
    assert engine.row_isolation == "fixed batch" if fixed_batch else engine.row_isolation is not None
    budgets = [40, 12, 30, 8, 24, 36, 16, 28, 20, 44]
    requests = [(random_image(80 + i, 70, i), parse_prompt(*PROMPTS[i % len(PROMPTS)])) for i in range(len(budgets))]
    alone = [engine.generate([image], [prompt], max_new_tokens=[budget])[0]
             for (image, prompt), budget in zip(requests, budgets)]
    scheduler = StepScheduler(engine)
    try:
        futures = [scheduler.submit(image, prompt, max_new_tokens=budget) for (image, prompt), budget
                   in zip(requests[:2], budgets)]
        wait_until(lambda: scheduler.stats.steps >= 2)
        for (image, prompt), budget in zip(requests[2:], budgets[2:]):
            futures.append(scheduler.submit(image, prompt, max_new_tokens=budget))
        for future, want in zip(futures, alone):
            got = future.result(timeout=120)
            assert got.token_ids == want.token_ids and got.token_logprobs == want.token_logprobs
        assert scheduler.slots == 8 and scheduler.stats.admitted > scheduler.slots  # some joined after others left
    finally:
        scheduler.close()
