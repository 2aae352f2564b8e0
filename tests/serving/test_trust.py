"""The engine's gate (segmentation/serving/trust.py) on its own: what reaches BentoML behind it, and when an
engine may start on the address it was given."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import socket
import tempfile

import pytest

from segmentation.serving.trust import (
    WIRE_VERSION,
    EngineGate,
    exposure_problem,
    is_private,
    listening_address,
)

TOKEN = "s3cret-token"


class App:
    """Stands in for BentoML's app behind the gate: records each request it receives and whether it
    read the body."""

    def __init__(self):
        self.seen: list[tuple[str, str]] = []
        self.read_bodies = 0

    async def __call__(self, scope, receive, send):
        self.seen.append((scope["method"], scope["path"]))
        message = await receive()
        self.read_bodies += bool(message.get("body"))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})


def call(gate, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""):
    """One request through `gate`: (status, headers, JSON body)."""
    headers = {**(headers or {}), **({"content-length": str(len(body))} if body else {})}
    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(gate(scope, receive, send))
    start, content = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), json.loads(content)


def good_headers(**extra) -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}", "content-type": "application/json",
            "x-seg-wire-version": WIRE_VERSION, **extra}


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /nonexistent/never",))


@pytest.mark.parametrize("token", [None, TOKEN])
@pytest.mark.parametrize("media_type", ["application/vnd.bentoml+pickle", "application/octet-stream",
                                        "multipart/form-data; boundary=x", "text/plain", None])
def test_no_body_but_json_reaches_the_engine(token, media_type):
    app = App()
    headers = good_headers()
    if media_type is None:  # a body without a Content-Type
        del headers["content-type"]
    else:
        headers["content-type"] = media_type
    status, answer_headers, body = call(EngineGate(app, token=token), "POST", "/predict", headers,
                                        pickle.dumps(Exploit()))
    assert status == 415 and "application/json" in body["error"]
    assert app.seen == [] and app.read_bodies == 0
    assert answer_headers[b"x-seg-wire-version"] == WIRE_VERSION.encode()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer ", TOKEN])
def test_without_the_token_nothing_but_probes_and_metrics(authorization):
    app = App()
    gate = EngineGate(app, token=TOKEN)
    headers = good_headers()
    if authorization is None:
        del headers["authorization"]
    else:
        headers["authorization"] = authorization
    for method, path in [("POST", "/predict"), ("POST", "/describe"), ("GET", "/docs.json"), ("GET", "/")]:
        status, answer_headers, body = call(gate, method, path, headers, b'{"items": []}')
        assert status == 401 and "SEG_ENGINE_TOKEN" in body["error"], path
        assert answer_headers[b"www-authenticate"] == b"Bearer"
    for path in ("/livez", "/readyz", "/healthz", "/metrics"):
        assert call(gate, "GET", path, headers)[0] == 200
    assert app.seen == [("GET", "/livez"), ("GET", "/readyz"), ("GET", "/healthz"), ("GET", "/metrics")]


def test_with_the_token_json_of_this_wire_version_goes_through():
    app = App()
    gate = EngineGate(app, token=TOKEN)
    assert call(gate, "POST", "/predict", good_headers(), b'{"items": []}')[0] == 200
    assert call(gate, "POST", "/describe", good_headers(**{"content-type": "Application/JSON; charset=utf-8"}),
                b"{}")[0] == 200
    assert app.seen == [("POST", "/predict"), ("POST", "/describe")] and app.read_bodies == 2


@pytest.mark.parametrize("version", [None, "1", "99", ""])
def test_another_wire_version_is_refused_naming_both(version):
    app = App()
    headers = good_headers()
    if version is None:
        del headers["x-seg-wire-version"]
    else:
        headers["x-seg-wire-version"] = version
    status, _, body = call(EngineGate(app, token=TOKEN), "POST", "/predict", headers, b'{"items": []}')
    assert status == 409 and f"engine speaks v{WIRE_VERSION}" in body["error"]
    assert f"v{version or '1'}" in body["error"]
    assert app.seen == []


def test_methods_the_routes_do_not_answer_are_405():
    app = App()
    gate = EngineGate(app, token=None)
    for method, path, allowed in [("TRACE", "/livez", b"GET, HEAD"), ("POST", "/readyz", b"GET, HEAD"),
                                  ("GET", "/predict", b"POST"), ("PUT", "/describe", b"POST")]:
        status, headers, _ = call(gate, method, path, good_headers())
        assert (status, headers[b"allow"]) == (405, allowed), (method, path)
    assert app.seen == []


def test_without_a_configured_token_the_engine_still_refuses_pickle_but_needs_no_token():
    app = App()
    gate = EngineGate(app, token=None)
    headers = good_headers()
    del headers["authorization"]
    assert call(gate, "POST", "/predict", headers, b'{"items": []}')[0] == 200
    headers["content-type"] = "application/vnd.bentoml+pickle"
    assert call(gate, "POST", "/predict", headers, b"x")[0] == 415


# --- where an engine may listen without a token -----------------------------------------------------


def bound(family: int, address) -> socket.socket:
    """A socket bound to `address` and never listening: it accepts no connection, it only has an address."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind(address)
    return sock


def test_the_address_comes_from_the_socket_bentoml_hands_the_worker():
    with bound(socket.AF_INET, ("127.0.0.1", 0)) as sock:
        address = listening_address(["worker.py", "bento", "--fd", str(sock.fileno()), "--service-name", "x"])
        assert address == sock.getsockname()
    assert listening_address(["bentoml", "serve", "service:SegmentationEngine"]) is None


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")])
def test_an_engine_on_every_address_without_a_token_must_not_start(family, host):
    with bound(family, (host, 0)) as sock:
        address = listening_address(["w", "--fd", str(sock.fileno())])
    problem = exposure_problem(address, token=None, insecure=False)
    assert problem and "SEG_ENGINE_TOKEN" in problem and "SEG_ENGINE_INSECURE" in problem and host in problem
    assert exposure_problem(address, token=TOKEN, insecure=False) is None
    assert exposure_problem(address, token=None, insecure=True) is None


def test_loopback_and_unix_sockets_need_no_token():
    with bound(socket.AF_INET, ("127.0.0.1", 0)) as v4, bound(socket.AF_INET6, ("::1", 0)) as v6:
        for sock in (v4, v6):
            address = listening_address(["w", "--fd", str(sock.fileno())])
            assert is_private(address) and exposure_problem(address, token=None, insecure=False) is None
    with tempfile.TemporaryDirectory() as directory, bound(socket.AF_UNIX, os.path.join(directory, "e.sock")) as unix:
        address = listening_address(["w", "--fd", str(unix.fileno())])
        assert isinstance(address, str) and exposure_problem(address, token=None, insecure=False) is None
    assert not is_private(("10.0.0.7", 3000)) and not is_private(("2001:db8::1", 3000, 0, 0))
