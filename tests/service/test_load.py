"""Concurrency: adaptive batches form, batched answers equal solo answers, nothing is lost."""

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


PROMPTS = ["cat", "dog ; cat", "the man on the left", "car ; bus ; person"]


def batch_histogram(metrics_text: str) -> tuple[float, float]:
    """(sum of batch sizes, number of batches) of the engine's adaptive batcher."""
    total = count = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("bentoml_service_adaptive_batch_size_sum{") and 'method_name="predict"' in line:
            total += float(line.rsplit(" ", 1)[1])
        if line.startswith("bentoml_service_adaptive_batch_size_count{") and 'method_name="predict"' in line:
            count += float(line.rsplit(" ", 1)[1])
    return total, count


async def post_all(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(body):
            async with limit:
                return await client.post(url + "/segment", json=body)

        return await asyncio.gather(*(one(b) for b in bodies))


def test_32_concurrent_requests_batch_and_equal_solo_answers(server):
    bodies = [{"image_base64": image_b64(i), "prompt": PROMPTS[i % 4], "mask_format": "rle"} for i in range(32)]
    before = batch_histogram(httpx.get(server.url + "/metrics").text)
    together = asyncio.run(post_all(server.url, bodies, concurrency=32))
    after = batch_histogram(httpx.get(server.url + "/metrics").text)
    assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200]
    items, batches = after[0] - before[0], after[1] - before[1]
    assert items == 32
    assert batches < 32, "no batch held more than one request"
    for body, response in zip(bodies, together):
        alone = httpx.post(server.url + "/segment", json=body, timeout=60)
        assert same_answer(alone.json(), response.json())


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
