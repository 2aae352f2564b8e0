"""`labels_from_prompt` over HTTP against a real `bentoml serve`: labels are only the prompt's classes,
and concurrent (batched) answers with the option on and off equal one-at-a-time answers."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from answers import same_answer
from PIL import Image

PROMPTS = [("cat ; dog", True), ("cat ; dog", False), ("the man on the left ; car", True), ("bus", False),
           ("zebra crossing", True), ("cat", True)]


def image_base64(seed: int, width: int = 96, height: int = 72) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def classes(prompt: str) -> set[str]:
    return {c.strip() for c in prompt.split(";")}


@pytest.fixture(scope="module")
def requests() -> list[dict]:
    return [{"image_base64": image_base64(i, 80 + 13 * i), "prompt": p, "labels_from_prompt": on}
            for i, (p, on) in enumerate(PROMPTS)]


def post(server, route: str, body: dict) -> dict:
    response = httpx.post(server.url + route, json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_every_label_is_one_of_the_classes_and_batched_equals_solo(server, requests):
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda body: post(server, "/segment", body), requests))
    for body, answer in zip(requests, together):
        assert same_answer(answer, post(server, "/segment", body))
        labels = [o["label"] for o in answer["objects"]]
        if body["labels_from_prompt"]:
            assert labels and set(labels) <= classes(body["prompt"]), answer["text"]
    # Off, the random demo model writes other labels: the option is what restricts them.
    assert not {o["label"] for o in together[1]["objects"]} <= {"cat", "dog"}, together[1]["text"]


def test_detect_multipart_and_segment_batch_take_the_field(server, requests):
    upload = {"image": ("x.png", base64.b64decode(requests[2]["image_base64"]), "image/png")}
    response = httpx.post(server.url + "/detect", files=upload,
                          data={"prompt": requests[2]["prompt"], "labels_from_prompt": "true"}, timeout=120)
    assert response.status_code == 200, response.text
    labels = {o["label"] for o in response.json()["objects"]}
    assert labels and labels <= classes(requests[2]["prompt"])
    assert all(o["mask"] is None for o in response.json()["objects"])

    batch = httpx.post(server.url + "/segment_batch", json={"requests": requests[:3]}, timeout=120).json()
    for body, answer in zip(requests[:3], batch):
        assert same_answer(answer, post(server, "/segment", body))


def test_a_wrong_value_is_400_naming_the_field(server, requests):
    response = httpx.post(server.url + "/segment", json={**requests[0], "labels_from_prompt": "maybe"}, timeout=60)
    assert response.status_code == 400 and "labels_from_prompt" in response.text
