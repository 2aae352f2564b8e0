"""Request ids, the one error shape and the log line of each error answer (segmentation/serving/errors.py)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from segmentation.serving.errors import (
    REQUEST_ID_HEADER,
    ErrorAnswers,
    normalize_error,
    quiet_client_errors,
    request_id_from,
)


@pytest.mark.parametrize("value", ["abc-123", "0af7651916cd43dd8448eb211c80319c", "trace:1/span=2+x.y_z"])
def test_a_sane_client_id_is_kept(value):
    assert request_id_from(value) == value
    assert request_id_from(value.encode()) == value


@pytest.mark.parametrize("value", [None, "", "a" * 129, "with space", "line\nbreak", "-leading", "é", "a%0d"])
def test_other_ids_are_replaced(value):
    replaced = request_id_from(value)
    assert replaced != value and len(replaced) == 32 and replaced.isalnum()


@pytest.mark.parametrize(("status", "body", "content_type", "error", "kind"), [
    (400, [{"error": "bad image"}], b"application/json", "bad image", "invalid_request"),
    (400, {"error": "1 validation error", "detail": [
        {"loc": ["body", "rle", "counts", "constrained-str"], "msg": "Input should be a valid string"},
        {"loc": ["polygons", 0, "list[function-before[_json_number(), constrained-int]]"], "msg": "Value error, x"},
        {"loc": ["prompt"], "msg": "String should have at least 1 character"},
        {"loc": ["prompt"], "msg": "String should match pattern '^[a]$'"}]},
     b"application/json",
     "invalid request: rle.counts: Input should be a valid string; polygons.0: x; prompt: must not be empty; "
     "prompt: PROMPT HINT", "invalid_request"),
    (400, {"error": "no image", "detail": "no image", "kind": "unusable_input"}, b"application/json", "no image",
     "unusable_input"),
    (404, b"Not Found", b"text/plain; charset=utf-8", "no such route; the API is described at /docs.json",
     "not_found"),
    (500, {"error": "An unexpected error has occurred, please check the server log."}, b"application/json",
     "internal error; the server log has the details under this request id", "internal"),
    (429, {"error": "Too many requests"}, b"application/json", "Too many requests", "overloaded"),
    (504, b"", b"", "the request took too long and was stopped", "timeout"),
])
def test_every_error_gets_one_shape(status, body, content_type, error, kind):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    out = normalize_error(status, raw, content_type, {"prompt": "PROMPT HINT"})
    assert out == {"error": error, "detail": error, "kind": kind}


class Answer:
    """A downstream app answering `status` with `body`, or raising."""

    def __init__(self, status=200, body=b"{}", content_type=b"application/json", raises=None):
        self.status, self.body, self.content_type, self.raises = status, body, content_type, raises

    async def __call__(self, scope, receive, send):
        if self.raises:
            raise self.raises
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", self.content_type), (b"content-length", b"999")]})
        await send({"type": "http.response.body", "body": self.body[:3], "more_body": True})
        await send({"type": "http.response.body", "body": self.body[3:]})


def call(app, path="/segment", method="POST", request_id=None):
    sent = []
    headers = [(b"x-request-id", request_id.encode())] if request_id else []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    asyncio.run(ErrorAnswers(app)({"type": "http", "path": path, "method": method, "headers": headers},
                                  receive, send))
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_success_gets_an_id_and_keeps_its_body():
    status, headers, body = call(Answer(200, b'{"ok": true}'), request_id="client-id-1")
    assert status == 200 and body == b'{"ok": true}' and headers[REQUEST_ID_HEADER.lower().encode()] == b"client-id-1"


def test_an_error_carries_the_id_in_body_header_and_log(caplog):
    with caplog.at_level(logging.INFO, logger="segmentation.requests"):
        status, headers, body = call(Answer(400, json.dumps([{"error": "bad image"}]).encode()))
    data = json.loads(body)
    assert status == 400 and data["error"] == "bad image" and data["kind"] == "invalid_request"
    assert headers[b"x-request-id"].decode() == data["request_id"]
    assert headers[b"content-length"] == str(len(body)).encode()
    [record] = [r for r in caplog.records if r.name == "segmentation.requests"]
    assert record.levelno == logging.INFO and data["request_id"] in record.getMessage() and not record.exc_info


def test_an_exception_is_a_500_without_internals_and_a_logged_traceback(caplog):
    with caplog.at_level(logging.INFO, logger="segmentation.requests"):
        status, _, body = call(Answer(raises=RuntimeError("secret /srv/models/x.npz <object at 0x7f>")))
    data = json.loads(body)
    assert status == 500 and "secret" not in body.decode() and "/srv" not in body.decode()
    [record] = [r for r in caplog.records if r.name == "segmentation.requests"]
    assert record.levelno == logging.ERROR and record.exc_info and data["request_id"] in record.getMessage()


def test_refusals_under_load_are_warnings_with_retry_after(caplog):
    with caplog.at_level(logging.INFO, logger="segmentation.requests"):
        status, headers, _ = call(Answer(503, b'{"error": "the model engine is unavailable"}'))
    assert status == 503 and headers[b"retry-after"] == b"1"
    assert [r.levelno for r in caplog.records if r.name == "segmentation.requests"] == [logging.WARNING]


def test_probe_answers_keep_their_body(caplog):
    loading = b'{"status": "loading", "reason": "the model engine is loading"}'
    with caplog.at_level(logging.INFO, logger="segmentation.requests"):
        status, headers, body = call(Answer(503, loading), path="/readyz", method="GET")
    assert status == 503 and body == loading and b"x-request-id" in headers
    assert not [r for r in caplog.records if r.name == "segmentation.requests"]


def test_head_errors_have_no_body():
    status, headers, body = call(Answer(405, b"Method Not Allowed", b"text/plain"), method="HEAD")
    assert status == 405 and body == b"" and headers[b"content-length"] == b"0"


def test_bentoml_client_error_records_are_dropped_and_server_errors_tagged():
    from pydantic import BaseModel, ValidationError

    class Model(BaseModel):
        x: int

    quiet_client_errors(("test.bentoml",))
    target = logging.getLogger("test.bentoml")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    target.addHandler(Keep())
    try:
        Model(x="no")
    except ValidationError:
        target.error("Exception on %s [%s]", "/segment", "POST", exc_info=True)
    try:
        raise KeyError("internal")
    except KeyError:
        target.error("Exception on %s [%s]", "/segment", "POST", exc_info=True)
    assert len(seen) == 1 and isinstance(seen[0].exc_info[1], KeyError)


def test_an_api_with_its_own_error_shape_keeps_it(caplog):
    """ErrorAnswers(own_shapes=...): the OpenAI-compatible API's error bodies pass as they are (with the id and
    the log line), other layers' errors on its paths are written in its shape, and elsewhere the one shape."""
    from segmentation.serving.openai_format import OpenAIErrorShape, error_body

    openai_shaped = json.dumps(error_body("The model 'x' does not exist", 404, param="model")).encode()

    def answered(path: str, body: bytes):
        sent = []

        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(message):
            sent.append(message)

        app = ErrorAnswers(Answer(404, body), own_shapes={"/v1/": OpenAIErrorShape})
        asyncio.run(app({"type": "http", "path": path, "method": "GET", "headers": []}, receive, send))
        return dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])

    with caplog.at_level(logging.INFO, logger="segmentation.requests"):
        headers, body = answered("/v1/models/x", openai_shaped)
    assert body == openai_shaped and headers[b"x-request-id"] and headers[b"content-length"] == str(len(body)).encode()
    assert "The model 'x' does not exist" in caplog.records[-1].getMessage()
    _, body = answered("/v1/models/x", b'{"error": "plain"}')  # another layer's error on /v1: OpenAI's shape
    assert json.loads(body) == error_body("plain", 404)
    _, body = answered("/segment", openai_shaped)
    assert set(json.loads(body)) == {"error", "detail", "kind", "request_id"}
