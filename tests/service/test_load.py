"""Concurrency: requests share the engine's batches (step-level by default, adaptive batches with
SEG_SCHEDULER=batches), batched answers equal solo answers, nothing is lost or answered twice."""

from __future__ import annotations

import asyncio
import base64
import io
import re

import httpx
import numpy as np
from answers import same_answer
from PIL import Image


def image_b64(seed: int, max_side: int = 400) -> str:
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(16, max_side)), int(rng.integers(16, max_side))
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PROMPTS = ["cat", "dog ; cat", "the man on the left", "car ; bus ; person", "tree ; sky ; bird ; horse"]


def histogram(metrics_text: str, name: str, label: str = "") -> tuple[float, float]:
    """(sum, count) of a histogram on /metrics (lines holding `label` only, when given)."""
    total = count = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_sum") and label in line:
            total += float(line.rsplit(" ", 1)[1])
        if line.startswith(f"{name}_count") and label in line:
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def step_rows(metrics_text: str) -> tuple[float, float]:
    """(sum of running rows, groups of decode steps) of the engine's step-level scheduler."""
    return histogram(metrics_text, "seg_engine_step_rows")


async def post_all(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(body):
            async with limit:
                return await client.post(url + "/segment", json=body)

        return await asyncio.gather(*(one(b) for b in bodies))


def test_32_concurrent_requests_batch_and_equal_solo_answers(server):
    bodies = [{"image_base64": image_b64(i), "prompt": PROMPTS[i % 4], "mask_format": "rle"} for i in range(32)]
    before = step_rows(httpx.get(server.url + "/metrics").text)
    together = asyncio.run(post_all(server.url, bodies, concurrency=32))
    after = step_rows(httpx.get(server.url + "/metrics").text)
    assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200]
    rows, groups = after[0] - before[0], after[1] - before[1]
    assert groups > 0 and rows / groups > 1.5, "the running batch rarely held more than one request"
    for body, response in zip(bodies, together):
        alone = httpx.post(server.url + "/segment", json=body, timeout=60)
        assert same_answer(alone.json(), response.json())


def test_16_clients_mixed_prompts_none_lost_none_answered_twice(server):
    """16 clients, prompts of 1 to 4 classes on distinct pictures: every request gets its own answer once
    (its answer alone, which differs from its neighbours' answers)."""
    bodies = [{"image_base64": image_b64(100 + i, 200), "prompt": PROMPTS[i % 5], "mask_format": "none"}
              for i in range(48)]
    alone = [httpx.post(server.url + "/segment", json=b, timeout=60).json() for b in bodies[:16]]
    together = asyncio.run(post_all(server.url, bodies, concurrency=16))
    assert [r.status_code for r in together] == [200] * len(bodies)
    answers = [r.json() for r in together]
    assert len({a["text"] for a in answers}) > 8  # distinct inputs, distinct answers: a mix-up would show
    for expected, got in zip(alone, answers):
        assert got["text"] == expected["text"] and got["prompt"] == expected["prompt"]


def test_adaptive_batches_still_form_with_the_batch_scheduler(server_home):
    """SEG_SCHEDULER=batches: BentoML's adaptive batcher gathers concurrent requests into batches."""
    from servers import kill_tree, start_server

    srv = start_server(server_home, {"SEG_SCHEDULER": "batches"})
    try:
        bodies = [{"image_base64": image_b64(i), "prompt": PROMPTS[i % 4], "mask_format": "none"} for i in range(16)]
        metric = ("bentoml_service_adaptive_batch_size", 'method_name="predict"')
        before = histogram(httpx.get(srv.url + "/metrics").text, *metric)
        together = asyncio.run(post_all(srv.url, bodies, concurrency=16))
        after = histogram(httpx.get(srv.url + "/metrics").text, *metric)
        assert all(r.status_code == 200 for r in together)
        items, batches = after[0] - before[0], after[1] - before[1]
        assert items == 16 and batches < 16, "no batch held more than one request"
        # The OpenAI-compatible API streams here too: the whole answer in one piece.
        import openai

        with openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
            content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_b64(3)}"}},
                       {"type": "text", "text": "cat ; dog"}]
            streamed = [c for c in client.chat.completions.create(
                model="demo/paligemma2-tiny-random", messages=[{"role": "user", "content": content}], stream=True)]
        text = "".join(c.choices[0].delta.content or "" for c in streamed)
        want = httpx.post(srv.url + "/segment", json={"image_base64": image_b64(3), "prompt": "cat ; dog"},
                          timeout=60).json()
        assert text == want["text"] and streamed[-1].choices[0].delta.segmentation == want
    finally:
        kill_tree(srv.process.pid)


def test_300_sequential_and_concurrent_requests_without_a_failure(server):
    # More than 200 requests cross BentoML's client recycling points (every 100 requests).
    body = {"image_base64": image_b64(1000), "prompt": "cat", "mask_format": "none"}
    statuses = []
    with httpx.Client(timeout=60) as client:
        for _ in range(100):
            statuses.append(client.post(server.url + "/segment", json=body).status_code)
    responses = asyncio.run(post_all(server.url, [body] * 200, concurrency=32))
    statuses += [r.status_code for r in responses]
    assert statuses.count(200) == 300, {s: statuses.count(s) for s in set(statuses)}
    texts = {r.json()["text"] for r in responses}
    assert len(texts) == 1  # the same input always gets the same answer
    assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200


def test_metrics_expose_stage_timings_objects_and_tokens(server):
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for stage in ("decode_input", "generate", "mask_decode", "encode"):
        assert re.search(rf'segmentation_stage_seconds_count{{stage="{stage}"}} [1-9]', text), stage
    assert re.search(r"segmentation_objects_per_request_count [1-9]", text)
    assert re.search(r"segmentation_generated_tokens_count [1-9]", text)
