"""Schema-driven fuzzing of every route of the served demo, and the malformed bodies it found, by hand.

`schemathesis run` (the CLI, in a subprocess, as an operator would run it) against the server's own
`/docs.json`, with a fixed seed, every operation (JSON and multipart bodies), positive and negative
data, and the checks:

- not_a_server_error: no 5xx for any input;
- response_schema_conformance, status_code_conformance, content_type_conformance,
  response_headers_conformance: answers are what the document says;
- negative_data_rejection: a request that breaks the document is refused;
- positive_data_acceptance_or_unusable (tests/service/fuzz/hooks.py): schemathesis'
  positive_data_acceptance, except answers of kind `unusable_input`, which the document describes
  (valid by the schema, but the image does not decode, the URL is refused...);
- missing_required_header, unsupported_method (`make test-slow`, with the coverage phase: TRACE and
  other undeclared methods must be 405 with `Allow`).

`make test` runs the examples and fuzzing phases with FUZZ_EXAMPLES (default 20) cases per operation;
`make test-slow` adds the coverage phase (boundary values, every undeclared method, missing fields) and
FUZZ_SLOW_EXAMPLES (default 80). FUZZ_SEED changes the seed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import kill_tree, start_server

HOOKS = Path(__file__).resolve().parent / "fuzz"
SEED = int(os.environ.get("FUZZ_SEED", "20261204"))
QUICK_CHECKS = ("not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance,"
                "response_headers_conformance,negative_data_rejection,positive_data_acceptance_or_unusable")
SLOW_CHECKS = QUICK_CHECKS + ",missing_required_header,unsupported_method"
API_ROUTES = ["/segment", "/detect", "/render", "/segment_batch", "/encode", "/models"]


@pytest.fixture(scope="module")
def fuzz_server(server_home):
    """Short answers (24 new tokens) and a short fetch timeout keep each fuzzed request fast."""
    srv = start_server(server_home, {"SEG_MAX_NEW_TOKENS": "24", "SEG_FETCH_TIMEOUT_S": "2",
                                     "SEG_MAX_BATCH_IMAGES": "4", "PYTHONUNBUFFERED": "1"})
    yield srv
    kill_tree(srv.process.pid)


def schemathesis(url: str, *, phases: str, examples: int, checks: str, tmp_path: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{url}/docs.json", "--checks", checks,
        "--phases", phases, "--mode", "all", "--seed", str(SEED), "--max-examples", str(examples),
        "--workers", "1", "--request-timeout", "60", "--generation-database", "none", "--no-color",
        "--output-truncate", "true", "--suppress-health-check", "all",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "hooks",
           "PYTHONPATH": os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3000)


def report(result: subprocess.CompletedProcess) -> str:
    """The failures part of schemathesis' output (long request bodies cut)."""
    text = re.sub(r"[A-Za-z0-9+/=]{400,}", "<long value>", result.stdout + result.stderr)
    return text[-12000:]


def test_schema_fuzzing_finds_nothing(fuzz_server, tmp_path):
    examples = int(os.environ.get("FUZZ_EXAMPLES", "20"))
    result = schemathesis(fuzz_server.url, phases="examples,fuzzing", examples=examples, checks=QUICK_CHECKS,
                          tmp_path=tmp_path)
    assert result.returncode == 0, report(result)
    assert "No issues found" in result.stdout
    tested = re.search(r"Tested: (\d+)", result.stdout)
    assert tested and int(tested.group(1)) == 11, result.stdout[-3000:]  # 6 API routes, GET /models, 4 GET routes


@pytest.mark.slow
def test_schema_fuzzing_long_run(fuzz_server, tmp_path):
    examples = int(os.environ.get("FUZZ_SLOW_EXAMPLES", "80"))
    result = schemathesis(fuzz_server.url, phases="examples,coverage,fuzzing", examples=examples,
                          checks=SLOW_CHECKS, tmp_path=tmp_path)
    print(result.stdout[-1500:])
    assert result.returncode == 0, report(result)


# ---- the malformed bodies the fuzzer found, and their relatives, by hand -----------------------------------

def png(width=32, height=24) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = png()
B64 = base64.b64encode(PNG).decode()
BOUNDARY = "b0undary"


def form(*parts: bytes, end: bool = True) -> bytes:
    return b"".join(b"--" + BOUNDARY.encode() + b"\r\n" + p + b"\r\n" for p in parts) + (
        b"--" + BOUNDARY.encode() + b"--\r\n" if end else b"")


PROMPT_PART = b'Content-Disposition: form-data; name="prompt"\r\n\r\ncat'
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"

MALFORMED = [
    # (route, content type, body, status, words in the error)
    ("/segment", "multipart/form-data", form(PROMPT_PART), 400, "boundary parameter"),
    ("/segment", "multipart/form-data; boundary=", b"--\r\n", 400, "boundary parameter"),
    ("/detect", MULTIPART, b"no boundary in here", 400, "does not contain its boundary"),
    ("/render", MULTIPART, form(PROMPT_PART, end=False), 400, "ends before its closing boundary"),
    ("/encode", MULTIPART, b"--b0undary\r\nContent-Disposition: form-data; name=\"label\"\r\nx", 400,
     "no end to its headers"),
    ("/models", MULTIPART, b"--b0undary\r\nfoo", 400, "multipart"),
    ("/segment", MULTIPART, form(b'Content-Disposition: form-data; name="file"; filename="x.png"\r\n'
                                 b"Content-Type: image/png\r\n\r\n" + PNG, PROMPT_PART), 400,
     "unknown field 'file'; accepted fields: image"),
    ("/segment", MULTIPART, form(b'Content-Disposition: form-data; name="prompt"; filename="p.png"\r\n\r\n' + PNG),
     400, "takes text, not a file"),
    ("/segment", MULTIPART, form(b'Content-Disposition: form-data; name="prompt"\r\n\r\n\xff\xfe\x00'), 400,
     "not valid UTF-8"),
    ("/segment", MULTIPART, form(b'Content-Disposition: form-data; name="image"\r\n\r\nhttp://localhost/x.png',
                                 PROMPT_PART), 400, "send a URL as 'image_url'"),
    ("/segment", MULTIPART, form(b'Content-Disposition: form-data; name="image"; filename="' + b"a" * 5000
                                 + b'.png"\r\n\r\n' + PNG, PROMPT_PART), 200, None),
    ("/segment", "application/x-www-form-urlencoded", b"prompt=%ff&image_url=x", 400, "not valid UTF-8"),
    ("/segment", "application/x-www-form-urlencoded", b"image=abc&prompt=cat", 400, "upload it with"),
    ("/segment", "application/json", b'{"prompt": "\xff\xfe", "image_base64": "AAAA"}', 400, "invalid request"),
    ("/segment", "application/json", b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "recursion limit"),
    ("/encode", "application/json", b'{"rle": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}", 400,
     "recursion limit"),
    ("/encode", "application/json", b'{"polygons": [[0, 0, 1, 0, 1, 1]], "width": ' + b"9" * 5000 + b', "height": 3}',
     400, "out of range"),
    ("/encode", "application/json", b'{"polygons": [[1e400, 0, 1, 0, 1, 1]], "width": 3, "height": 3}', 400,
     "polygons.0.0"),
    ("/encode", "application/json", b'{"polygons": [[0, 0, 1e30, 0, 5, 5]], "width": 8, "height": 8}', 400,
     "polygons.0.2"),
    ("/encode", "application/json", b'{"rle": {"size": [2, 2], "counts": [0, 4]}, "box": [NaN, 0, 1, 1]}', 400,
     "box.0: must be a finite number"),
    ("/segment", "application/json", b"[1, 2]", 400, "Input should be an object"),
    ("/segment", "application/json", b"\"http://localhost/x.png\"", 400, "Input should be an object"),
    ("/segment", "application/json; charset=latin-1", b"{}", 415, "must be UTF-8"),
    ("/segment", "text/plain", b"cat", 415, "text/plain is not accepted; accepted: application/json, multipart"),
    ("/segment", None, json.dumps({"prompt": "cat", "image_base64": B64}).encode(), 415, "no Content-Type"),
    ("/segment", "application/vnd.bentoml+pickle", b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00N.", 415,
     "never accepted"),
    ("/describe", "application/vnd.bentoml+pickle", b"\x80\x04N.", 404, "no such route"),
    ("/models", "application/json", b'{"a": 1}', 400, "a: Extra inputs are not permitted"),
    ("/models", "application/json", b"{", 400, "Invalid JSON"),
]


@pytest.mark.parametrize(("route", "content_type", "body", "status", "words"), MALFORMED,
                         ids=[f"{i}{m[0]}" for i, m in enumerate(MALFORMED)])
def test_malformed_bodies_are_4xx_with_the_error_shape(fuzz_server, route, content_type, body, status, words):
    headers = {"Content-Type": content_type} if content_type else {}
    response = httpx.post(fuzz_server.url + route, content=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text[:2000]
    if words is None:
        return
    data = response.json()
    assert set(data) == {"error", "detail", "kind", "request_id"}, data
    assert words in data["error"], data
    assert response.headers["x-request-id"] == data["request_id"]


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("TRACE", "/livez", "GET, HEAD"), ("POST", "/readyz", "GET, HEAD"), ("DELETE", "/metrics", "GET, HEAD"),
    ("PUT", "/docs.json", "GET, HEAD"), ("PATCH", "/ui/", "GET, HEAD"), ("TRACE", "/segment", "POST"),
    ("GET", "/segment_batch", "POST"), ("OPTIONS", "/encode", "POST"), ("DELETE", "/models", "GET, POST"),
])
def test_undeclared_methods_are_405_with_allow(fuzz_server, method, path, allow):
    response = httpx.request(method, fuzz_server.url + path, timeout=30)
    assert response.status_code == 405 and response.headers["allow"] == allow
    assert response.json()["kind"] == "invalid_request"


@pytest.mark.parametrize("path", ["/livez", "/healthz", "/readyz", "/metrics", "/docs.json", "/schema.json", "/",
                                  "/ui/", "/ui/app.js", "/nowhere", "/ui/../../etc/passwd", "/%ff%fe"])
def test_every_read_route_answers_without_a_server_error(fuzz_server, path):
    for method in ("GET", "HEAD"):
        response = httpx.request(method, fuzz_server.url + path, timeout=30)
        assert response.status_code < 500, (method, path, response.status_code)
        if response.status_code >= 400 and method == "GET":
            assert set(response.json()) == {"error", "detail", "kind", "request_id"}


INTERNALS = re.compile(r"Traceback|File \"|/work/|/tmp/|/home/|site-packages|\.py\b|0x[0-9a-f]{6,}|<[A-Za-z_.]+ "
                       r"object|Error\(|Exception|PosixPath|BytesIO|\\\\x")


def test_errors_carry_no_internals_and_their_id_is_in_the_log(fuzz_server):
    """Several kinds of error: each body is free of tracebacks, paths and reprs, and the server logged the
    error under the same request id (at INFO, without a traceback)."""
    url = fuzz_server.url
    corrupt = base64.b64encode(PNG[:40]).decode()
    provoked = [
        httpx.post(url + "/segment", json={"prompt": "cat", "image_base64": corrupt}, timeout=60),
        httpx.post(url + "/segment", json={"prompt": "cat", "image_base64": base64.b64encode(b"GIF89a...").decode()},
                   timeout=60),
        httpx.post(url + "/segment", json={"prompt": "cat", "image_url": "http://nonexistent.invalid/x.png"},
                   timeout=60),
        httpx.post(url + "/segment", json={"prompt": "cat", "image_url": "http://127.0.0.1:1/x.png"}, timeout=60),
        httpx.post(url + "/encode", json={"rle": {"size": [4, 4], "counts": "0000000"}}, timeout=60),
        httpx.post(url + "/encode", json={"mask_base64": corrupt}, timeout=60),
        httpx.post(url + "/segment", json={"prompt": "cat", "image_base64": B64, "model": "/etc/passwd"}, timeout=60),
        httpx.post(url + "/segment", files={"image": ("x.png", PNG)}, data={"prompt": "cat", "mask-format": "png"},
                   timeout=60),
        httpx.post(url + "/segment", content=b"\x80\x04N.", headers={"Content-Type": "application/vnd.bentoml+pickle"},
                   timeout=60),
        httpx.post(url + "/nowhere", json={}, timeout=60),
        httpx.post(url + "/segment", json={"prompt": "cat", "image_base64": B64},
                   headers={"X-Request-ID": "client-chosen-id-42"}, timeout=60),
    ]
    ids = []
    for response in provoked[:-1]:
        assert 400 <= response.status_code < 500, (response.status_code, response.text)
        text = response.text
        assert not INTERNALS.search(text), text
        data = response.json()
        assert data["request_id"] == response.headers["x-request-id"]
        ids.append(data["request_id"])
    assert provoked[-1].status_code == 200 and provoked[-1].headers["x-request-id"] == "client-chosen-id-42"
    assert len(set(ids)) == len(ids)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        logs = fuzz_server.logs(tail=None)
        missing = [i for i in ids if f"request {i}:" not in logs]
        if not missing:
            break
        time.sleep(0.2)
    assert not missing, f"no log line for {missing}"
    for request_id in ids:
        [line] = [line for line in logs.splitlines() if f"request {request_id}:" in line]
        assert "[INFO]" in line, line
    assert "Traceback" not in logs
