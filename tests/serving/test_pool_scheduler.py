"""The model pool with step-level batching (`start_schedulers`, `predict_one`): the same predictions as the
batched path, concurrent requests answered each with its own, bad requests answered alone."""

import asyncio
import contextlib

import numpy as np
import pytest
from PIL import Image

from segmentation.model.graph.decoder import GraphSettings
from segmentation.model.prompts import parse_prompt
from segmentation.serving.pool import ModelPool, PredictRequest


def picture(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (70 + seed, 90, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pools(tiny_fixtures):
    load = dict(device="cpu", generation="graph", graph=GraphSettings(buckets=(1, 2, 4), sync_every=3))
    batched = ModelPool.load({"tiny": tiny_fixtures / "paligemma"}, tiny_fixtures / "vae-oid.npz", **load)
    stepped = ModelPool.load({"tiny": tiny_fixtures / "paligemma"}, tiny_fixtures / "vae-oid.npz", **load)
    finished = []
    stepped.start_schedulers(on_finish=lambda job, generation: finished.append(job.steps))
    yield batched, stepped, finished
    stepped.close()


def test_concurrent_requests_get_the_batched_answers(pools):
    batched, stepped, finished = pools
    prompts = ["cat", "dog ; car", "the man on the left", "bird ; tree ; sky ; cat", "car"]
    requests = [PredictRequest("tiny", picture(i), parse_prompt(p, "detect" if i % 2 else "segment"), 30)
                for i, p in enumerate(prompts)]
    want = batched.predict(requests)

    async def all_at_once():
        return await asyncio.gather(*(stepped.predict_one(r) for r in requests))

    got = asyncio.run(all_at_once())
    assert any(o.prediction.objects for o in want)
    for g, w in zip(got, want):
        assert g.status == 200 and g.prediction.text == w.prediction.text
        for a, b in zip(g.prediction.objects, w.prediction.objects):
            assert a.label == b.label and a.locs == b.locs and a.score == pytest.approx(b.score, abs=1e-4)
            # The mask decoder runs one mask here and the batch's masks there: equal up to float rounding.
            assert (a.mask64 is None and b.mask64 is None) or np.allclose(a.mask64, b.mask64, atol=1e-5)
    assert len(finished) >= len(requests)  # the metrics hook saw each row end


def test_an_unknown_model_is_answered_alone(pools):
    _, stepped, _ = pools

    async def mixed():
        return await asyncio.gather(stepped.predict_one(PredictRequest("nope", picture(1), parse_prompt("cat"))),
                                    stepped.predict_one(PredictRequest("tiny", picture(2), parse_prompt("cat"), 10)))

    bad, good = asyncio.run(mixed())
    assert bad.status == 400 and "unknown model 'nope'" in bad.error
    assert good.status == 200


def test_a_request_that_runs_out_of_time_is_a_504(pools):
    _, stepped, _ = pools
    outcome = asyncio.run(stepped.predict_one(PredictRequest("tiny", picture(3), parse_prompt("cat ; dog"), 400),
                                              timeout_s=0.01))
    assert outcome.status == 504 and "ran out of time" in outcome.error


def test_schedulers_need_the_graph_engine(tiny_fixtures):
    pool = ModelPool.load({"tiny": tiny_fixtures / "paligemma"}, tiny_fixtures / "vae-oid.npz", device="cpu",
                          generation="fast")
    with pytest.raises(ValueError, match="needs the graph engine"):
        pool.start_schedulers()


def test_requests_that_wait_too_long_for_a_slot_are_shed_with_503(tiny_fixtures):
    # Without the grammar the random model hardly ever ends by itself: each request runs its whole budget.
    load = dict(device="cpu", generation="graph", graph=GraphSettings(buckets=(1,), sync_every=4), constrained=False)
    pool = ModelPool.load({"tiny": tiny_fixtures / "paligemma"}, tiny_fixtures / "vae-oid.npz", **load)
    pool.start_schedulers(max_wait_s=0.2)

    async def crowd():
        # One slot: the first request holds it for hundreds of steps, the others wait and are shed.
        return await asyncio.gather(*(pool.predict_one(PredictRequest("tiny", picture(i), parse_prompt("cat"), 300))
                                      for i in range(3)))

    try:
        first, *rest = asyncio.run(crowd())
    finally:
        pool.close()
    assert first.status == 200
    assert [o.status for o in rest] == [503, 503] and all("overloaded" in o.error for o in rest)


def stream(pool, request, stop_after=None):
    """stream_one's events (closing it after `stop_after` text events), and the scheduler's running rows
    and dropped requests afterwards."""
    async def read():
        events = []
        async with contextlib.aclosing(pool.stream_one(request)) as source:
            async for event in source:
                events.append(event)
                if stop_after is not None and sum("text" in e for e in events) == stop_after:
                    break
        scheduler = pool.schedulers["tiny"]
        for _ in range(500):  # the scheduler drops the cancelled row at its next look
            if scheduler.running == 0:
                break
            await asyncio.sleep(0.01)
        return events, scheduler.running, scheduler.stats.dropped

    return asyncio.run(read())


def test_a_streamed_request_adds_up_to_its_predicted_answer(pools):
    batched, stepped, _ = pools
    request = PredictRequest("tiny", picture(4), parse_prompt("bird ; tree ; sky ; cat", "detect"), 120)
    [want] = batched.predict([request])
    events, running, _ = stream(stepped, request)
    *pieces, last = events
    outcome = last["outcome"]
    # A piece per group of 3 steps (the pool's sync_every), the last ones in the outcome.
    assert len(pieces) >= max(3, outcome.prediction.generated_tokens // 3 - 2)
    assert all(set(p) == {"text", "tokens", "logprobs"} for p in pieces)
    assert outcome.status == 200 and outcome.prediction.text == want.prediction.text
    assert want.prediction.text.startswith("".join(p["text"] for p in pieces))
    streamed = [t for p in pieces for t in p["tokens"]]
    assert streamed == outcome.prediction.tokens[:len(streamed)]
    assert outcome.prediction.prompt_tokens > 256 and outcome.prediction.finish_reason in ("stop", "length")
    assert running == 0


def test_closing_a_stream_cancels_its_request(pools):
    _, stepped, _ = pools
    request = PredictRequest("tiny", picture(5), parse_prompt("bird ; tree ; sky ; cat", "detect"), 400)
    dropped = stepped.schedulers["tiny"].stats.dropped
    events, running, dropped_after = stream(stepped, request, stop_after=2)
    assert [("outcome" in e) for e in events] == [False, False]
    assert running == 0 and dropped_after == dropped + 1


def test_a_cut_answer_and_its_refusals(pools):
    batched, stepped, _ = pools
    request = PredictRequest("tiny", picture(6), parse_prompt("cat ; dog"), 60)
    [whole] = batched.predict([request])
    cut = PredictRequest("tiny", picture(6), parse_prompt("cat ; dog"), 60, cut_after=9)
    [batched_cut] = batched.predict([cut])
    stepped_cut = asyncio.run(stepped.predict_one(cut))
    for outcome in (batched_cut, stepped_cut):
        assert outcome.status == 200 and outcome.prediction.finish_reason == "length"
        assert outcome.prediction.generated_tokens == 9 and whole.prediction.text.startswith(outcome.prediction.text)
    assert batched_cut.prediction.text == stepped_cut.prediction.text
    for value in (0, 10_000):
        request = PredictRequest("tiny", picture(6), parse_prompt("cat"), cut_after=value)
        refused = asyncio.run(stepped.predict_one(request))
        assert refused.status == 400 and "cut_after must be 1 to" in refused.error
