import asyncio
import json

import pytest

from segmentation.serving.errors import ErrorAnswers, normalize_error_body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([{"error": "bad image"}], "bad image"),
        ({"error": "1 validation error", "detail": [{"loc": ["body", "prompt"], "msg": "Input should be a valid string",
                                                     "type": "string_type"}]},
         "invalid request: prompt: Input should be a valid string"),
        ({"error": "x", "detail": [{"loc": ["mask-format"], "msg": "Extra inputs are not permitted"},
                                   {"loc": ["requests", 0, "task"], "msg": "String should match pattern"}]},
         "invalid request: mask-format: Extra inputs are not permitted; "
         "requests.0.task: does not have the accepted form (see /docs.json)"),
    ],
)
def test_error_bodies_get_one_shape(body, message):
    out = json.loads(normalize_error_body(json.dumps(body).encode()))
    assert out == {"error": message, "detail": message}


@pytest.mark.parametrize("body", [b'{"error": "fine already"}', b"not json", b'{"error": "x", "detail": "text"}'])
def test_good_or_foreign_bodies_are_left_alone(body):
    assert normalize_error_body(body) is None


@pytest.mark.parametrize(("status", "headers", "retry_after"), [
    (429, [], b"1"), (503, [], b"1"), (503, [(b"retry-after", b"7")], b"7"), (500, [], None), (200, [], None)])
def test_refusals_say_when_to_retry(status, headers, retry_after):
    """BentoML answers its own 503s (a full batch queue) without Retry-After."""
    async def app(scope, receive, send):  # a downstream ASGI app answering `status`
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain"), *headers]})
        await send({"type": "http.response.body", "body": b"x"})

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "path": "/segment", "headers": [(b"content-length", b"0")]}
    asyncio.run(ErrorAnswers(app)(scope, receive, send))
    assert sent[0]["status"] == status
    assert dict(sent[0]["headers"]).get(b"retry-after") == retry_after
