"""Request framing before BentoML parses a body: media types, methods, multipart and url-encoded forms."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segmentation.serving.framing import (
    JSON_ONLY,
    MAX_TEXT_PART_BYTES,
    PUBLIC_MEDIA_TYPES,
    FramingError,
    RequestFraming,
    RouteForm,
    check_media_type,
    read_form,
    read_multipart,
)

ROUTE = RouteForm(fields=("image", "prompt", "model", "box", "flag"), files=frozenset({"image"}),
                  strings=frozenset({"prompt", "model"}), nullable=frozenset({"model", "box"}))


@pytest.mark.parametrize(("content_type", "has_body", "status", "words"), [
    ("application/vnd.bentoml+pickle", True, 415, "never accepted"),
    ("application/vnd.bentoml+pickle; protocol=5", False, 415, "never accepted"),
    ("text/plain", True, 415, "text/plain is not accepted; accepted: application/json"),
    ("", True, 415, "no Content-Type"),
    (None, True, 415, "no Content-Type"),
    ("application/json; charset=latin-1", True, 415, "must be UTF-8"),
    ("application json", True, 415, "malformed"),
    ("application/json; charset", True, 415, "malformed"),
])
def test_refused_media_types(content_type, has_body, status, words):
    refusal = check_media_type(content_type, accepted=PUBLIC_MEDIA_TYPES, has_body=has_body)
    assert refusal is not None and refusal.status == status and words in refusal.message


@pytest.mark.parametrize(("content_type", "accepted", "has_body"), [
    ("application/json", JSON_ONLY, True),
    (b"Application/JSON; charset=UTF-8", JSON_ONLY, True),
    (None, JSON_ONLY, False),
    ("multipart/form-data; boundary=x", PUBLIC_MEDIA_TYPES, True),
    ("application/x-www-form-urlencoded", PUBLIC_MEDIA_TYPES, True),
])
def test_accepted_media_types(content_type, accepted, has_body):
    assert check_media_type(content_type, accepted=accepted, has_body=has_body) is None


def test_the_engine_set_refuses_forms():
    assert check_media_type("multipart/form-data; boundary=x", accepted=JSON_ONLY).status == 415


def run(app, scope, body: bytes = b""):
    """Call an ASGI app; the answer's status, headers and body, and whether the body was read."""
    sent, read = [], []

    async def receive():
        read.append(True)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), payload, bool(read)


def scope(method="POST", path="/predict", headers=()):
    return {"type": "http", "method": method, "path": path, "headers": list(headers)}


class Echo:
    """A downstream app that answers 200 with the body it read and the headers it was given."""

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.scope = scope
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})


def multipart(*parts: tuple[str, bytes | str, str | None, str | None], boundary: str = "XyZ") -> bytes:
    out = b""
    for name, content, filename, content_type in parts:
        head = f'Content-Disposition: form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        if content_type:
            head += f"\r\nContent-Type: {content_type}"
        content = content.encode() if isinstance(content, str) else content
        out += f"--{boundary}\r\n{head}\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def parts_of(body: bytes, boundary: str = "XyZ") -> dict[str, bytes]:
    from segmentation.serving.framing import split_multipart

    return {p.name: p.content for p in split_multipart(body, boundary)}


def test_multipart_is_rewritten_as_bentoml_reads_it():
    body = multipart(("image", b"\x89PNG\x00\xff", "../../etc/evil name.png", "image/png"),
                     ("prompt", "123", None, None), ("model", '"tiny"', None, None), ("flag", "true", None, None),
                     ("box", "[0, 0, 1, 1]", None, "application/json"))
    out = read_multipart(body, "XyZ", ROUTE)
    assert b'filename="upload"' in out and b"evil" not in out
    parts = parts_of(out)
    assert parts["image"] == b"\x89PNG\x00\xff"
    assert json.loads(parts["prompt"]) == "123"  # a string field's text is its value, whatever it looks like
    assert json.loads(parts["model"]) == "tiny"  # a JSON string literal (BentoML's client) is decoded once
    assert parts["flag"] == b"true" and json.loads(parts["box"]) == [0, 0, 1, 1]


def test_null_means_no_value_only_where_the_field_allows_it():
    parts = parts_of(read_multipart(multipart(("model", "null", None, None), ("prompt", "null", None, None)),
                                    "XyZ", ROUTE))
    assert parts["model"] == b"null" and json.loads(parts["prompt"]) == "null"


@pytest.mark.parametrize(("body", "words"), [
    (multipart(("file", b"\xff\xd8", "x.png", "image/png")), "unknown field 'file'; accepted fields: image, prompt"),
    (multipart(("prompt", b"\xff\xfe", None, None)), "not valid UTF-8"),
    (multipart(("prompt", b"cat", "prompt.txt", "text/plain")), "takes text, not a file; file fields: 'image'"),
    (multipart(("image", "http://example.com/x.png", None, None)), "must be a file upload"),
    (multipart(("prompt", "a", None, None), ("prompt", "b", None, None)), "more than once"),
    (multipart(("box", "[0, 0,", None, "application/json")), "not valid JSON"),
    (multipart(("prompt", "cat", None, "text/html")), "Content-Type text/html is not accepted"),
    (multipart(("prompt", "x" * MAX_TEXT_PART_BYTES, None, None)), "form text value may hold"),
    (b"garbage", "does not contain its boundary"),
    (b"--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\ncat", "ends before its closing boundary"),
    (b"--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\ncat\r\n--XyZ--", "no end to its headers"),
    (b"--XyZ\r\nContent-Disposition: attachment\r\n\r\ncat\r\n--XyZ--\r\n", "needs 'Content-Disposition: form-data"),
    (b"--XyZ\r\nno colon here\r\n\r\ncat\r\n--XyZ--\r\n", "malformed header"),
    (b"--XyZ" + b"\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n\r\n--XyZ" * 70 + b"--", "more than 64 parts"),
])
def test_malformed_multipart_is_a_framing_error(body, words):
    with pytest.raises(FramingError, match=None) as refused:
        read_multipart(body, "XyZ", ROUTE)
    assert words in str(refused.value)
    assert refused.value.status == 400


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.binary(max_size=300), st.lists(st.sampled_from([b"--XyZ", b"\r\n", b"--XyZ--", b"\r\n\r\n",
                                                             b'Content-Disposition: form-data; name="prompt"',
                                                             b"filename=\"a\"", b";", b":"]), max_size=12))
def test_any_bytes_are_parsed_or_refused_never_crash(noise, pieces):
    body = b"".join(pieces) + noise
    try:
        read_multipart(body, "XyZ", ROUTE)
    except FramingError:
        pass


def test_forms():
    assert read_form(b"prompt=cat+%3B+dog&flag=true", ROUTE) == b"prompt=%22cat+%3B+dog%22&flag=true"
    for body, words in [(b"promt=cat", "unknown field 'promt'"), (b"image=x", "upload it with Content-Type"),
                        (b"prompt=%ff", "not valid UTF-8"), (b"prompt=\xc3\xa9", "not valid UTF-8"),
                        (b"prompt", "malformed")]:
        with pytest.raises(FramingError) as refused:
            read_form(body, ROUTE)
        assert words in str(refused.value)


def framing(app=None):
    return RequestFraming(app or Echo(), routes={"/segment": ROUTE}, read_paths=frozenset({"/livez"}),
                          read_prefixes=("/ui",))


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("TRACE", "/livez", "GET, HEAD"), ("POST", "/livez", "GET, HEAD"), ("DELETE", "/ui/app.js", "GET, HEAD"),
    ("GET", "/segment", "POST"), ("OPTIONS", "/segment", "POST")])
def test_undeclared_methods_are_405_with_allow(method, path, allow):
    status, headers, payload, _ = run(framing(), scope(method, path))
    assert status == 405 and headers[b"allow"] == allow.encode()
    assert json.loads(payload)["error"].startswith(f"{method} is not allowed on {path}")


def test_unknown_paths_pass_to_the_router():
    assert run(framing(), scope("TRACE", "/nowhere"))[0] == 200


def test_a_form_reaches_the_app_rewritten_with_its_length():
    echo = Echo()
    body = multipart(("prompt", "cat", None, None))
    status, _, payload, _ = run(framing(echo), scope(path="/segment", headers=[
        (b"content-type", b"multipart/form-data; boundary=XyZ"), (b"content-length", str(len(body)).encode())]), body)
    assert status == 200 and parts_of(payload) == {"prompt": b'"cat"'}
    assert dict(echo.scope["headers"])[b"content-length"] == str(len(payload)).encode()


@pytest.mark.parametrize("content_type", [b"multipart/form-data", b"multipart/form-data; boundary=",
                                          b"multipart/form-data; boundary=" + b"x" * 71])
def test_a_multipart_body_needs_a_boundary(content_type):
    status, _, payload, read = run(framing(), scope(path="/segment", headers=[(b"content-type", content_type)]),
                                   b"--x\r\n")
    assert status == 400 and "boundary" in json.loads(payload)["error"] and not read


def test_json_passes_untouched():
    status, _, payload, _ = run(framing(), scope(path="/segment", headers=[(b"content-type", b"application/json")]),
                                b'{"prompt": "cat"}')
    assert status == 200 and payload == b'{"prompt": "cat"}'


def test_a_get_route_answers_get_as_the_post_of_an_empty_object():
    echo = Echo()
    app = RequestFraming(echo, routes={"/models": ROUTE, "/segment": ROUTE}, get_routes=frozenset({"/models"}))
    status, _, payload, _ = run(app, scope("GET", "/models", headers=[(b"content-type", b"text/plain")]))
    assert status == 200 and payload == b"{}" and echo.scope["method"] == "POST"
    assert dict(echo.scope["headers"])[b"content-type"] == b"application/json"
    assert run(app, scope("GET", "/segment"))[1][b"allow"] == b"POST"  # only the routes named
    assert run(app, scope("PUT", "/models"))[1][b"allow"] == b"GET, POST"
