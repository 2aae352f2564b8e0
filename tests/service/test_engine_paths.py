"""Loud fallbacks through the real server: every decode step on /metrics by how it ran, and /models saying
whether the engine replays CUDA graphs (on this CPU it cannot: every step is `fixed`, and says so)."""

from __future__ import annotations

import re

import httpx
from test_load import image_b64

PATHS = ("graph", "fixed", "peft", "fast", "hf-generate")


def steps(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {path: float(value) for path, value in
            re.findall(r'^seg_engine_steps_total\{path="([^"]+)"\} ([0-9.e+-]+)$', text, re.M)}


def test_every_decode_step_is_counted_by_the_path_it_took(server):
    before = steps(server.url)
    assert set(before) == set(PATHS)  # every path exported from the start, at 0 where unused
    response = httpx.post(server.url + "/segment", json={"image_base64": image_b64(3), "prompt": "cat ; dog"},
                          timeout=120)
    assert response.status_code == 200, response.text
    middle = steps(server.url)
    assert middle["fixed"] > before["fixed"]  # the fixed-shape step, eagerly: no CUDA graphs on a CPU
    assert all(middle[p] == before[p] for p in ("graph", "peft", "fast", "hf-generate"))
    # A prompt longer than the graph engine's cache holds (SEG_GRAPH_PROMPT_TOKENS, 128) runs the fast loop.
    long_prompt = " ; ".join(f"zq{i}xv{i}kw" for i in range(16))  # 170 tokens of the tiny tokenizer
    response = httpx.post(server.url + "/detect", json={"image_base64": image_b64(4), "prompt": long_prompt},
                          timeout=300)
    assert response.status_code == 200, response.text
    after = steps(server.url)
    assert after["fast"] > middle["fast"] and after["graph"] == 0


def test_models_says_whether_graphs_are_captured(server):
    [model] = httpx.post(server.url + "/models", json={}, timeout=60).json()["models"]
    graphs = model["graphs"]
    assert graphs["engine"] == "graph" and graphs["built"] is True
    assert graphs["captured"] is False and graphs["buckets"] == [] and graphs["failures"] == {}
    assert graphs["eager_buckets"] == [1, 2, 4, 8, 16] and graphs["why"].startswith("no CUDA graphs on cpu")
