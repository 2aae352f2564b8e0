"""The OpenAI-compatible API (/v1) through the official `openai` SDK against a real served demo: the same
answers as /segment and /detect, plain and streamed as the running batch decodes, cut by max_tokens,
adapters by name, the SDK's own exception class for each bad input, and a stream cancelled midway frees
its engine slot."""

from __future__ import annotations

import base64
import functools
import io
import re
import time

import httpx
import numpy as np
import openai
import pytest
from answers import same_answer
from imageserver import ImageServer
from pictures import random_image
from PIL import Image

DEMO_MODEL = "demo/paligemma2-tiny-random"
# Many classes: an answer of several objects (29 tokens with the tiny random model: streamed in several pieces).
LONG_PROMPT = "cat ; dog ; car ; bus ; person ; bird ; tree ; sky"


def png_b64(seed: int, size: tuple[int, int] = (160, 120)) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def messages(image: str | list[str] | None, text: str | None = "cat ; dog") -> list[dict]:
    images = [] if image is None else [image] if isinstance(image, str) else image
    parts = [{"type": "image_url", "image_url": {"url": url if "://" in url else f"data:image/png;base64,{url}"}}
             for url in images]
    if text is not None:
        parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as sdk:
        yield sdk


def segment(url: str, route: str = "/segment", **body) -> dict:
    response = httpx.post(url + route, json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def collect(stream) -> dict:
    """A stream's pieces: role, content deltas, logprobs, finish reason, segmentation, usage."""
    out = {"roles": [], "contents": [], "logprobs": [], "finish": [], "segmentation": None, "usage": None,
           "chunks": 0}
    for piece in stream:
        out["chunks"] += 1
        assert piece.object == "chat.completion.chunk"
        if piece.usage is not None:
            out["usage"] = piece.usage
        for choice in piece.choices:
            delta = choice.delta
            if delta.role:
                out["roles"].append(delta.role)
            if delta.content:
                out["contents"].append(delta.content)
            if choice.logprobs is not None and choice.logprobs.content:
                out["logprobs"] += choice.logprobs.content
            if choice.finish_reason:
                out["finish"].append(choice.finish_reason)
                out["segmentation"] = delta.segmentation
    return out


def test_models_are_listed_and_retrieved_by_id(client):
    [model] = client.models.list().data
    assert (model.id, model.object, model.owned_by, model.parent, model.root) == \
        (DEMO_MODEL, "model", "paligemma-segmentation", None, DEMO_MODEL)
    assert client.models.retrieve(DEMO_MODEL).id == DEMO_MODEL  # the id holds a "/": percent-encoded by the SDK
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("google/no-such-model")
    assert caught.value.body["code"] == "model_not_found"


def test_a_completion_equals_segment_s_answer(client, server):
    image = png_b64(1)
    answer = client.chat.completions.create(model=DEMO_MODEL, messages=messages(image), logprobs=True)
    want = segment(server.url, image_base64=image, prompt="cat ; dog")
    [choice] = answer.choices
    assert answer.object == "chat.completion" and answer.model == DEMO_MODEL and answer.id.startswith("chatcmpl-")
    assert answer._request_id  # the X-Request-ID header every answer carries
    assert choice.message.role == "assistant" and choice.message.content == want["text"]
    assert same_answer(choice.message.segmentation, want) and choice.message.segmentation["objects"]
    assert choice.finish_reason in ("stop", "length")
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == want["text"] and all(t.logprob <= 0 for t in tokens)
    # The prompt's real tokens: 256 image tokens, <bos>, the prompt's text and its "\n".
    assert 256 + 1 + 4 < answer.usage.prompt_tokens < 256 + 20
    assert answer.usage.completion_tokens == len(tokens) > 20
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_mask_format_detect_prompts_and_image_urls(client, server):
    image = png_b64(2, (97, 180))
    answer = client.chat.completions.create(model=DEMO_MODEL, messages=messages(image, "segment car"),
                                            extra_body={"mask_format": "png"})
    assert same_answer(answer.choices[0].message.segmentation,
                       segment(server.url, image_base64=image, prompt="car", mask_format="png"))
    detected = client.chat.completions.create(model=DEMO_MODEL, messages=messages(image, "detect car ; bus"),
                                              extra_body={"labels_from_prompt": True})
    want = segment(server.url, "/detect", image_base64=image, prompt="car ; bus", labels_from_prompt=True)
    assert same_answer(detected.choices[0].message.segmentation, want)
    assert all(o["mask"] is None for o in want["objects"])
    buffer = io.BytesIO()
    Image.new("RGB", (120, 80), (200, 10, 10)).save(buffer, "JPEG")
    with ImageServer({"/photo.jpg": (200, {"Content-Type": "image/jpeg"}, buffer.getvalue())}) as site:
        url = site.url("/photo.jpg", "localhost")  # the test server allow-lists localhost
        fetched = client.chat.completions.create(model=DEMO_MODEL, messages=messages(url, "cat"))
        assert site.hits["/photo.jpg"] == 1
    assert same_answer(fetched.choices[0].message.segmentation,
                       segment(server.url, image_base64=base64.b64encode(buffer.getvalue()).decode(), prompt="cat"))


def test_a_stream_comes_in_pieces_and_adds_up_to_the_completion(client, server):
    image = png_b64(3)
    plain = client.chat.completions.create(model=DEMO_MODEL, messages=messages(image, LONG_PROMPT), logprobs=True)
    stream = client.chat.completions.create(model=DEMO_MODEL, messages=messages(image, LONG_PROMPT), stream=True,
                                            stream_options={"include_usage": True}, logprobs=True)
    got = collect(stream)
    assert got["roles"] == ["assistant"]
    assert len(got["contents"]) >= 10  # tokens as they decode, not one piece at the end
    assert "".join(got["contents"]) == plain.choices[0].message.content
    assert got["finish"] == [plain.choices[0].finish_reason]
    assert same_answer(got["segmentation"], plain.choices[0].message.segmentation)
    assert same_answer(got["segmentation"], segment(server.url, image_base64=image, prompt=LONG_PROMPT))
    assert got["usage"] == plain.usage
    assert [t.token for t in got["logprobs"]] == [t.token for t in plain.choices[0].logprobs.content]
    np.testing.assert_allclose([t.logprob for t in got["logprobs"]],
                               [t.logprob for t in plain.choices[0].logprobs.content], atol=1e-4)


def test_max_tokens_cuts_the_answer_with_finish_reason_length(client):
    image = png_b64(4)
    whole = client.chat.completions.create(model=DEMO_MODEL, messages=messages(image), logprobs=True)
    assert whole.usage.completion_tokens > 12
    cut = client.chat.completions.create(model=DEMO_MODEL, messages=messages(image), max_tokens=12, logprobs=True)
    [choice] = cut.choices
    assert choice.finish_reason == "length" and cut.usage.completion_tokens == 12
    assert [t.token for t in choice.logprobs.content] == [t.token for t in whole.choices[0].logprobs.content[:12]]
    assert whole.choices[0].message.content.startswith(choice.message.content)
    assert choice.message.segmentation["text"] == choice.message.content
    streamed = collect(client.chat.completions.create(model=DEMO_MODEL, messages=messages(image), stream=True,
                                                      max_completion_tokens=12))
    assert streamed["finish"] == ["length"] and "".join(streamed["contents"]) == choice.message.content


@functools.cache
def too_many_pixels() -> list[dict]:
    """48 megapixels (the server takes 40) in one color: a small PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", (8000, 6000), (9, 9, 9)).save(buffer, "PNG")
    return messages(base64.b64encode(buffer.getvalue()).decode())


@pytest.mark.parametrize(("name", "kwargs", "error", "param"), [
    ("not an image", {"messages": messages(base64.b64encode(b"hello world").decode())}, openai.BadRequestError,
     "messages[0].content"),
    ("no image", {"messages": messages(None)}, openai.BadRequestError, "messages[0].content"),
    ("text only", {"messages": [{"role": "user", "content": "segment cat"}]}, openai.BadRequestError,
     "messages[0].content"),
    ("two images", {"messages": messages([png_b64(1), png_b64(2)])}, openai.BadRequestError, "messages[0].content"),
    ("unknown model", {"model": "google/no-such-model"}, openai.NotFoundError, "model"),
    ("sampling", {"temperature": 0.7}, openai.BadRequestError, "temperature"),
    ("several choices", {"n": 2}, openai.BadRequestError, "n"),
    ("unknown field", {"extra_body": {"mask-format": "png"}}, openai.BadRequestError, "mask-format"),
    ("over the token cap", {"max_tokens": 100_000}, openai.BadRequestError, "max_tokens"),
    ("a system prompt", {"messages": [{"role": "system", "content": "be brief"}, *messages(png_b64(1))]},
     openai.BadRequestError, "messages"),
    ("too many pixels", {}, openai.APIStatusError, "messages[0].content"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_each_bad_input_raises_the_sdk_s_own_exception(client, name, kwargs, error, param, stream):
    sent = too_many_pixels() if name == "too many pixels" else messages(png_b64(5))
    request = {"model": DEMO_MODEL, "messages": sent, **kwargs}
    with pytest.raises(error) as caught:
        client.chat.completions.create(stream=stream, **request)
    body = caught.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["param"] == param and body["message"]
    assert caught.value.request_id  # the server logged the error under it
    if name == "too many pixels":
        assert caught.value.status_code == 413 and body["code"] == "request_too_large"


def test_other_v1_errors_come_in_openai_s_shape(server):
    for method, path, status in (("GET", "/v1/no-such-route", 404), ("GET", "/v1/chat/completions", 405),
                                 ("POST", "/v1/models", 405)):
        response = httpx.request(method, server.url + path, timeout=30)
        assert response.status_code == status, (path, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text
    response = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def engine_metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    wanted = ("seg_engine_running_slots", "seg_engine_requests_in_flight", "seg_engine_steps_per_request_count",
              "segmentation_time_to_first_token_seconds_count", "segmentation_inter_token_latency_seconds_count")
    return {name: float(re.search(rf"^{name} (\S+)$", text, re.M)[1]) for name in wanted}


def test_a_stream_cancelled_midway_frees_its_slot(client, server):
    before = engine_metrics(server.url)
    assert before["seg_engine_running_slots"] == 0
    # The tiny model's longest known answer (135 tokens, about 0.4 s on 2 quiet cores): the client leaves
    # at its first piece, with the rest still to decode (LONG_PROMPT's answer is over in 0.1 s, too soon).
    picture = io.BytesIO()
    random_image(93, 70, 13).save(picture, "PNG")
    stream = client.chat.completions.create(
        model=DEMO_MODEL, max_tokens=400, stream=True,
        messages=messages(base64.b64encode(picture.getvalue()).decode(), "segment the man on the left"))
    for piece in stream:
        if piece.choices and piece.choices[0].delta.content:
            break
    running = engine_metrics(server.url)
    stream.close()
    deadline = time.monotonic() + 30
    while (now := engine_metrics(server.url))["seg_engine_running_slots"] or now["seg_engine_requests_in_flight"]:
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    assert running["seg_engine_running_slots"] == 1 and running["seg_engine_requests_in_flight"] == 1
    # Its row left the batch without finishing (a finished row counts in steps_per_request).
    assert now["seg_engine_steps_per_request_count"] == before["seg_engine_steps_per_request_count"]
    # Time to first token and the gaps after it were measured for the stream.
    assert now["segmentation_time_to_first_token_seconds_count"] == before[
        "segmentation_time_to_first_token_seconds_count"] + 1
    assert now["segmentation_inter_token_latency_seconds_count"] >= before[
        "segmentation_inter_token_latency_seconds_count"] + 2
    # The server serves on.
    assert client.chat.completions.create(model=DEMO_MODEL, messages=messages(png_b64(7), "cat")).choices


def test_adapters_by_name(adapter_server):
    from lora import SERVED_ADAPTERS

    with openai.OpenAI(base_url=adapter_server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as sdk:
        listed = {m.id: m for m in sdk.models.list().data}
        assert list(listed) == [DEMO_MODEL, *SERVED_ADAPTERS]
        assert all(listed[a].parent == listed[a].root == DEMO_MODEL for a in SERVED_ADAPTERS)
        image = png_b64(8)
        texts = set()
        for model in (DEMO_MODEL, *SERVED_ADAPTERS):
            answer = sdk.chat.completions.create(model=model, messages=messages(image, "cat"))
            want = segment(adapter_server.url, image_base64=image, prompt="cat", model=model)
            assert answer.model == model and answer.choices[0].message.content == want["text"], model
            assert same_answer(answer.choices[0].message.segmentation, want), model
            streamed = collect(sdk.chat.completions.create(model=model, messages=messages(image, "cat"), stream=True))
            assert "".join(streamed["contents"]) == want["text"], model
            texts.add(want["text"])
        assert len(texts) > 1  # the adapters change the answers: each was really used
