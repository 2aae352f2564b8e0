"""`segmentation.client` against a real `bentoml serve` of the tiny fixtures, compared with the library."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segmentation.client import AsyncRemoteSegmenter, RemoteSegmenter, RequestRejected, ServerUnavailable
from segmentation.model.results import SegmentationResult

ROOT = Path(__file__).resolve().parents[2]
# Few classes: random weights write to the token budget, which grows with the classes (shorter tests).
PROMPTS = ["cat ; dog", "car", "bus"]


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("client-images")
    sizes = [(320, 240), (97, 180), (224, 224)]
    return [write_image(folder / f"img{i}.png", w, h, seed=10 + i) for i, (w, h) in enumerate(sizes)]


def assert_same_results(remote: list[SegmentationResult], local: list[SegmentationResult]) -> None:
    """Masks pixel for pixel, boxes and labels equal; scores within the server's 6-digit rounding."""
    assert len(remote) == len(local)
    for r, loc in zip(remote, local):
        assert (r.prompt, r.text, r.width, r.height) == (loc.prompt, loc.text, loc.width, loc.height)
        assert [o.label for o in r.objects] == [o.label for o in loc.objects]
        for ro, lo in zip(r.objects, loc.objects):
            assert ro.box == lo.box
            assert ro.box_normalized == pytest.approx(lo.box_normalized, abs=1e-6)
            assert ro.score == pytest.approx(lo.score, abs=1e-6)
            if lo.mask is None:
                assert ro.mask is None
            else:
                assert ro.mask.dtype == bool and ro.mask.shape == lo.mask.shape
                assert np.array_equal(ro.mask, lo.mask)


def test_remote_segment_equals_library(server, segmenter, images):
    pictures = [Image.open(p).convert("RGB") for p in images]
    local = segmenter.segment(pictures, PROMPTS)
    assert any(o.mask is not None for r in local for o in r.objects), "the fixtures should give some masks"
    with RemoteSegmenter(server.url) as remote:
        # Paths, encoded bytes and in-memory PIL images give the same answers.
        assert_same_results(remote.segment(images, PROMPTS), local)
        assert_same_results(remote.segment([images[0].read_bytes(), pictures[1], str(images[2])], PROMPTS), local)
        # One prompt for all images, and one image alone, as Segmenter accepts them.
        assert_same_results(remote.segment(images, "cat ; dog"), segmenter.segment(pictures, "cat ; dog"))
        assert_same_results(remote.segment(pictures[0], "car"), segmenter.segment(pictures[0], "car"))


def test_remote_detect_equals_library(server, segmenter, images):
    pictures = [Image.open(p).convert("RGB") for p in images]
    local = segmenter.detect(pictures, PROMPTS)
    with RemoteSegmenter(server.url) as remote:
        remote_results = remote.detect(images, PROMPTS)
    assert_same_results(remote_results, local)
    assert all(o.mask is None for r in remote_results for o in r.objects)


def test_async_client_concurrent_equals_library(server, segmenter, images):
    pictures = [Image.open(p).convert("RGB") for p in images]
    local = segmenter.segment(pictures * 4, PROMPTS * 4)

    async def run():
        async with AsyncRemoteSegmenter(server.url, concurrency=8) as remote:
            # Many tasks sharing one client, each sending its own image object.
            return await asyncio.gather(*(remote.segment_one(p, q) for p, q in zip(pictures * 4, PROMPTS * 4)))

    assert_same_results(list(asyncio.run(run())), local)


def test_rejection_carries_server_message(server, images):
    with RemoteSegmenter(server.url) as remote:
        with pytest.raises(RequestRejected) as empty:
            remote.segment(images[0], "")
        with pytest.raises(RequestRejected) as corrupt:
            remote.segment(b"this is not an image", "cat")
        with pytest.raises(RequestRejected) as unknown:
            RemoteSegmenter(server.url, model="no/such-model").segment(images[0], "cat")
    assert empty.value.status == 400 and "prompt" in empty.value.message
    assert corrupt.value.status == 400 and "accepted formats" in corrupt.value.message
    assert unknown.value.status == 400 and "served models" in unknown.value.message


def test_soft_masks_and_mismatched_prompts_are_refused_locally(images):
    remote = RemoteSegmenter("http://127.0.0.1:9")  # nothing listens: neither call may reach the network
    with pytest.raises(ValueError, match="soft"):
        remote.segment(images, "cat", soft=True)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        remote.segment(images, ["cat", "dog"])


class FlakyServer:
    """A stand-in for an overloaded server: answers `failures` times with `status`, then relays to `target`."""

    def __init__(self, target: str, status: int, failures: int):
        import httpx

        self.calls = 0
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                state.calls += 1
                if state.calls <= failures:
                    payload, code = json.dumps({"error": "the model is overloaded; retry"}).encode(), status
                else:
                    relayed = httpx.post(target + self.path, content=body, timeout=120,
                                         headers={"Content-Type": "application/json"})
                    payload, code = relayed.content, relayed.status_code
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("status", [503, 429])
def test_retries_shed_requests_then_succeeds(server, segmenter, images, status):
    flaky = FlakyServer(server.url, status, failures=2)
    try:
        with RemoteSegmenter(flaky.url, backoff_s=0.01) as remote:
            [result] = remote.segment(images[0], "cat ; dog")
    finally:
        flaky.close()
    assert flaky.calls == 3
    assert_same_results([result], segmenter.segment(Image.open(images[0]).convert("RGB"), "cat ; dog"))


def test_gives_up_after_retries(server, images):
    flaky = FlakyServer(server.url, 503, failures=100)
    try:
        with RemoteSegmenter(flaky.url, retries=2, backoff_s=0.01) as remote, pytest.raises(ServerUnavailable) as err:
            remote.segment(images[0], "cat")
    finally:
        flaky.close()
    assert flaky.calls == 3 and err.value.status == 503 and "overloaded" in err.value.message


def test_dropped_connection_is_retried(images):
    """A server that closes the connection without answering: each try is a new connection."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []

    def drop_all():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.recv(65536)
            conn.close()

    threading.Thread(target=drop_all, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with RemoteSegmenter(url, retries=3, backoff_s=0.01) as remote, pytest.raises(ServerUnavailable) as err:
            remote.segment(images[0], "cat")
    finally:
        listener.close()
    assert len(accepted) == 4 and "connection" in err.value.message


def test_import_loads_no_model_libraries():
    code = (
        "import sys, segmentation.client, segmentation.model.results;"
        "heavy = [m for m in ('torch', 'jax', 'bentoml', 'transformers', 'cv2') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
