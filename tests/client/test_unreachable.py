"""No server at the URL: the client's first call and the labeller stop at once and say how to start one;
with a server they run as before, and a client that has reached its server retries lost connections."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_client import FlakyServer

from segmentation.client import (
    AsyncRemoteSegmenter,
    RemoteSegmenter,
    ServerUnavailable,
    ServerUnreachable,
    check_server,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def dead_url() -> str:
    """A port on 127.0.0.1 where nothing listens (taken from the OS, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i}.png")
    return folder


def assert_says_no_server(err: ServerUnreachable, url: str) -> None:
    assert isinstance(err, ServerUnavailable)  # what callers caught before still catches it
    assert err.url == url and err.status is None
    assert str(err).startswith(f"no server answering at {url} (")
    assert "Connection refused" in err.reason and "make demo" in str(err)


def test_first_call_fails_at_once_without_retries(dead_url, photos):
    image = photos / "p0.png"
    # Six retries with a 2 s backoff would take over a minute: the first call must not retry.
    with RemoteSegmenter(dead_url, retries=6, backoff_s=2.0) as remote:
        for call in (lambda: remote.segment(image, "cat"), lambda: remote.encode(np.ones((4, 4), bool), "box"),
                     remote.models):
            start = time.monotonic()
            with pytest.raises(ServerUnreachable) as err:
                call()
            assert time.monotonic() - start < 5
            assert_says_no_server(err.value, dead_url)


def test_async_first_call_fails_at_once(dead_url, photos):
    async def run():
        async with AsyncRemoteSegmenter(dead_url, retries=6, backoff_s=2.0) as remote:
            await remote.segment([photos / "p0.png", photos / "p1.png"], "cat")

    start = time.monotonic()
    with pytest.raises(ServerUnreachable) as err:
        asyncio.run(run())
    assert time.monotonic() - start < 5
    assert_says_no_server(err.value, dead_url)


def test_check_server(dead_url, server):
    check_server(server.url)
    check_server(server.url + "/")
    with pytest.raises(ServerUnreachable) as err:
        check_server(dead_url)
    assert_says_no_server(err.value, dead_url)
    with pytest.raises(ValueError, match="http://127.0.0.1:3000"):
        RemoteSegmenter("127.0.0.1:3000")


def test_first_call_to_a_real_server_answers(server, photos):
    with RemoteSegmenter(server.url) as remote:
        [result] = remote.segment(photos / "p0.png", "cat")
    assert (result.width, result.height) == (64, 48)


def test_a_client_that_reached_its_server_retries_lost_connections(server, photos):
    relay = FlakyServer(server.url, 503, failures=0)  # passes every request on to the real server
    with RemoteSegmenter(relay.url, retries=2, backoff_s=0.01) as remote:
        [result] = remote.segment(photos / "p0.png", "cat")
        assert (result.width, result.height) == (64, 48)
        relay.close()  # the server goes away (a restart): connections are refused from now on
        with pytest.raises(ServerUnavailable) as err:
            remote.segment(photos / "p0.png", "cat")
    assert not isinstance(err.value, ServerUnreachable) and "connection failed" in err.value.message
    assert relay.calls == 1


def label(photos: Path, out: Path, url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segmentation.label", str(photos), "--prompt", "cat", "--url", url,
                           "--out", str(out), "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_labeller_stops_at_once_without_a_server(dead_url, photos, tmp_path):
    start = time.monotonic()
    done = label(photos, tmp_path / "out", dead_url)
    assert time.monotonic() - start < 30  # the interpreter's start; no retries
    assert done.returncode == 3, done.stdout + done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: no server answering at {dead_url} (")
    assert "make demo" in line and "--url" in line and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_labeller_with_a_server_runs(server, photos, tmp_path):
    done = label(photos, tmp_path / "out", server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "labelled 2 images" in done.stdout


def test_labeller_refuses_a_url_without_a_scheme(photos, tmp_path):
    done = label(photos, tmp_path / "out", "127.0.0.1:3000")
    assert done.returncode == 2 and "--url: the server URL must look like http://127.0.0.1:3000" in done.stderr
