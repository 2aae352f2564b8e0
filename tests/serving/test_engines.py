"""The public tier's engine client (segmentation/serving/engines.py) against a real HTTP server on 127.0.0.1
behind the engine's real gate: the token and the wire version travel with every call, a refusing engine is
reported with its reason, and a Unix socket works as an engine URL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import threading
import time

import pytest
import uvicorn
from servers import free_port

from segmentation.serving import trust
from segmentation.serving.engines import EngineError, EngineRefused, RemoteEngines
from segmentation.serving.probes import Readiness

TOKEN = "the-shared-secret"
MODELS = [{"id": "demo", "image_size": 224, "default": True}]


async def engine_app(scope, receive, send):
    """What the engine answers behind its gate (the gate is the code under test)."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": message["type"] + ".complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await receive()
    body = json.dumps(MODELS if scope["path"] == "/describe" else {"status": "ok"}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def serving(token: str | None, **where):
    """The gated app served by uvicorn in a thread, on 127.0.0.1 (`port=`) or a Unix socket (`uds=`)."""
    server = uvicorn.Server(uvicorn.Config(trust.EngineGate(engine_app, token=token), log_level="warning",
                                           lifespan="on", **where))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def engine_url():
    port = free_port()
    with serving(TOKEN, host="127.0.0.1", port=port):
        yield f"http://127.0.0.1:{port}"


def engines(url: str, token: str | None) -> RemoteEngines:
    return RemoteEngines([url], timeout_s=5, max_in_flight=4, token=token)


async def ask(client: RemoteEngines, what):
    try:
        return await what(client)
    finally:
        await client.close()


def test_the_right_token_is_served(engine_url):
    assert asyncio.run(ask(engines(engine_url, TOKEN), lambda c: c.describe())) == MODELS
    assert asyncio.run(ask(engines(engine_url, TOKEN), lambda c: c.is_ready(2))) is True


@pytest.mark.parametrize("token", [None, "not-the-secret"])
def test_a_wrong_token_is_a_503_whose_reason_names_the_token(engine_url, token):
    with pytest.raises(EngineRefused) as refused:
        asyncio.run(ask(engines(engine_url, token), lambda c: c.describe()))
    assert refused.value.status == 503 and "SEG_ENGINE_TOKEN" in str(refused.value)
    with pytest.raises(EngineRefused, match="SEG_ENGINE_TOKEN"):
        asyncio.run(ask(engines(engine_url, token), lambda c: c.is_ready(2)))


def test_readiness_reports_the_refusal(engine_url):
    readiness = Readiness(check_timeout_s=5)
    client = engines(engine_url, "not-the-secret")
    readiness.attach(client)

    async def check():
        try:
            return await readiness.check()
        finally:
            await client.close()

    ready, reason = asyncio.run(check())
    assert not ready and "SEG_ENGINE_TOKEN" in reason


def test_another_release_of_the_engine_is_named_with_both_versions(engine_url, monkeypatch):
    client = engines(engine_url, TOKEN)  # speaks this release's version
    monkeypatch.setattr(trust, "WIRE_VERSION", str(int(trust.WIRE_VERSION) + 1))  # the engine, upgraded
    with pytest.raises(EngineRefused) as refused:
        asyncio.run(ask(client, lambda c: c.describe()))
    message = str(refused.value)
    assert f"public tier speaks wire format v{int(trust.WIRE_VERSION) - 1}" in message
    assert f"engine v{trust.WIRE_VERSION}" in message


def test_an_engine_on_a_unix_socket():
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "engine.sock")
        with serving(TOKEN, uds=path):
            assert asyncio.run(ask(engines(f"unix://{path}", TOKEN), lambda c: c.describe())) == MODELS


def test_nothing_listening_is_503_unavailable():
    with pytest.raises(EngineError) as failed:
        asyncio.run(ask(engines(f"http://127.0.0.1:{free_port()}", TOKEN), lambda c: c.describe()))
    assert failed.value.status == 503 and not isinstance(failed.value, EngineRefused)


# --- /predict_stream: events read as they come; leaving early closes the connection ----------------------

STREAM_EVENTS = [{"text": "<loc0001>", "tokens": ["<loc0001>"], "logprobs": [-0.5]},
                 {"text": "", "tokens": ["<0xE2>"], "logprobs": [-1.0]}]
OUTCOME = {"prediction": None, "error": "the model is overloaded: no free slot", "status": 503}


def streaming_app(events: list[dict], outcome: dict | None, left: threading.Event):
    """An engine that streams `events` (then `outcome`, unless None: the stream breaks off), one every 50 ms,
    and sets `left` when its caller disconnects mid-stream."""
    from segmentation.serving.engines import stream_event

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            return await engine_app(scope, receive, send)
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for event in [*events, *([{"outcome": outcome}] if outcome else [])]:
            await send({"type": "http.response.body", "body": stream_event(event).encode(), "more_body": True})
            try:
                message = await asyncio.wait_for(receive(), 0.05)
            except TimeoutError:
                continue
            if message["type"] == "http.disconnect":
                left.set()
                return
        if outcome is None:
            raise RuntimeError("the engine died mid-stream")
        await send({"type": "http.response.body", "body": b""})

    return app


@contextlib.contextmanager
def streaming(events, outcome):
    left = threading.Event()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(trust.EngineGate(streaming_app(events, outcome, left), token=TOKEN),
                                           host="127.0.0.1", port=port, log_level="critical", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", left
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def an_item():
    from PIL import Image

    from segmentation.serving.bento import EngineItem

    return EngineItem(model="demo", image=Image.new("RGB", (224, 224)), task="segment", classes=["cat"], cut_after=5)


def test_a_stream_is_read_event_by_event_up_to_its_outcome():
    async def read(client):
        events = [event async for event in client.predict_stream(an_item())]
        return events, sum(r.in_flight for r in client.replicas.values())

    with streaming(STREAM_EVENTS, OUTCOME) as (url, _):
        events, in_flight = asyncio.run(ask(engines(url, TOKEN), read))
    assert events[:2] == STREAM_EVENTS and in_flight == 0
    assert events[2]["outcome"].status == 503 and events[2]["outcome"].error == OUTCOME["error"]


def test_leaving_a_stream_early_closes_its_connection():
    async def first_only(client):
        events = client.predict_stream(an_item())
        async with contextlib.aclosing(events):
            first = await anext(events)
        return first, sum(r.in_flight for r in client.replicas.values())

    many = [{"text": "x", "tokens": ["x"], "logprobs": [0.0]}] * 100
    with streaming(many, OUTCOME) as (url, left):
        first, in_flight = asyncio.run(ask(engines(url, TOKEN), first_only))
        assert left.wait(5)  # the engine saw its caller go: it cancels the request there
    assert first == many[0] and in_flight == 0


def test_a_stream_that_breaks_off_is_503():
    async def read(client):
        return [event async for event in client.predict_stream(an_item())]

    with streaming(STREAM_EVENTS, None) as (url, _), pytest.raises(EngineError) as failed:
        asyncio.run(ask(engines(url, TOKEN), read))
    assert failed.value.status == 503 and failed.value.retry_after == 1
