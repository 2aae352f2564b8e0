"""Step-level batching through the real server: a client that goes away frees its slot at once."""

from __future__ import annotations

import re
import time

import httpx
from servers import kill_tree, start_server
from test_load import image_b64


def gauge(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_client_that_disconnects_frees_its_slot(server_home):
    # One slot and a long budget (150 objects of 21 tokens); without the grammar the random model hardly
    # ever ends by itself, so the abandoned request alone would hold the slot for about 3000 steps.
    srv = start_server(server_home, {"SEG_GRAPH_BUCKETS": "1", "SEG_MAX_NEW_TOKENS": "3000",
                                     "SEG_OBJECTS_PER_CLASS": "150", "SEG_CONSTRAINED": "false"})
    try:
        body = {"image_base64": image_b64(7), "prompt": "cat", "mask_format": "none"}
        try:
            response = httpx.post(srv.url + "/segment", json=body, timeout=1.5)
            raise AssertionError(f"a 3000-token answer came back within 1.5 s: {response.text[:300]}")
        except httpx.TimeoutException:
            pass  # the client gave up and closed its connection
        left = time.monotonic()
        while gauge(srv.url, "seg_engine_running_slots") > 0:
            assert time.monotonic() - left < 5, "the abandoned request still holds its slot"
            time.sleep(0.1)
        # Its steps stopped too: the engine's step counter stands still.
        steps = histogram_count(srv.url, "seg_engine_step_rows")
        time.sleep(1.0)
        assert histogram_count(srv.url, "seg_engine_step_rows") == steps
    finally:
        kill_tree(srv.process.pid)



def histogram_count(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.search(rf"^{name}_count ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0
