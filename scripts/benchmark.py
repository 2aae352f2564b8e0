#!/usr/bin/env python
"""Throughput and latency of the segmentation service, its batching, and its overhead over the raw model.

    # start servers on the random "medium" model and measure everything (make bench)
    .venv/bin/python scripts/benchmark.py --start --size medium --compare-batching --baseline \
        --micro --readyz --concurrency 1,4,16
    # drive a server that is already running
    .venv/bin/python scripts/benchmark.py --url http://127.0.0.1:3000 --concurrency 1,8 --requests 100

Each concurrency level sends `--requests` JSON requests (`/segment`, base64 images of mixed sizes,
mixed prompts, a fixed seed) from C concurrent asyncio clients (httpx) and reports throughput, latency
percentiles, errors by status, and, from `/metrics` deltas over the level, the engine's batch-size
histogram and the mean seconds per stage. `--compare-batching` runs the same load against a second
server with `SEG_MAX_BATCH_SIZE=1`; `--baseline` runs the same inputs through `Segmenter.predict`
in this process (no server) at the batch size the server used most; `--micro` times mask decode +
paste + RLE per object and checks the decoder never recompiles after warm-up; `--readyz` times a
tiny-model server from start to a green `/readyz`. `--compare-adapters N` starts one server with
N random LoRA adapters of the model (SEG_ADAPTERS) and sends the same load at the highest
concurrency twice per round: every request to the base, then requests spread over the base and the
N adapters (same model, same server, interleaved): throughput ratio and mean batch size of each;
`--adapter-share F` sends a fraction F of the mixed requests to the adapters (the rest to the base;
default: round-robin over base and adapters), `--adapters-ref REF` runs the same comparison on the
service as it was at commit REF too (after this tree's).
`--label` times `python -m segmentation.label`'s work (`label_folder`, default concurrency) on a
folder of the workload's images against the first server, beside the service's best throughput on
the same images and prompt (raw JSON requests at 16/32/64 clients) and a sequential
`RemoteSegmenter` loop (on the first 16 images).

Engine settings: `--compare-engines` adds a server with `SEG_ENGINE=hf-generate` (the engine before
the fast loop) and, on CPUs with native bfloat16, one with `SEG_DTYPE=bfloat16`; `--engine-micro` times
prefill and decode step at batch 1 and 8 for each engine setting beside a bare loop of forward calls
(scripts/engine_timing.py). `--seed-dir DIR` serves the original FastAPI service from a checkout DIR
beside ours on the same model (scripts/seed_service.py) and reports its req/s, tokens/s and errors.

Streamed answers: at the levels of `--stream-levels` (default 1 and 16 clients) the same requests go,
right after the level, through the OpenAI-compatible API with `stream: true` (`/v1/chat/completions`) from
as many clients: time to first token (first text piece received, p50/p90) beside the level's req/s, and
the streamed req/s. Servers without `/v1` (an older commit, the original service) are skipped.

Random-weight models generate up to their token budget, so the budget is what the benchmark controls:
`--max-new-tokens` sets the server's `SEG_MAX_NEW_TOKENS` ceiling (and the baseline's). Writes JSON
(`--out`) and a PNG plot (`--plot`): throughput and p95 latency against concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts", ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import httpx  # noqa: E402
from seed_service import count_tokens, ensure_venv, seed_prompt, served_seed  # noqa: E402
from servers import import_fixtures, kill_tree, start_server  # noqa: E402  (tests/servers.py)

IMAGE_SIZES = ((640, 480), (1024, 768), (320, 240), (800, 800), (480, 640), (224, 224))
PROMPTS = ("cat", "cat ; dog", "person", "car ; bus ; truck", "the man on the left", "bird",
           "car ; bus ; truck ; person")  # 1 to 4 classes: rows of very different lengths
DISTINCT_IMAGES = 24
BATCH_METRIC = "bentoml_service_adaptive_batch_size"
STEP_ROWS_METRIC = "seg_engine_step_rows"  # step-level batching: running rows per group of steps
FIRST_STEP_METRIC = "seg_engine_time_to_first_step_seconds"
STEPS_METRIC = "seg_engine_steps"  # seg_engine_steps_total{path}: decode steps by how they ran
UNBATCHED = "scripts.benchmark_unbatched:Segmentation"
TARGETS = {
    "batching_speedup": 2.2,  # adaptive / max_batch_size=1 throughput at the highest concurrency
    "service_fraction": 0.85,  # end-to-end / raw batched throughput
    "decode_paste_rle_ms": 3.0,  # per object at 640x480
    "readyz_tiny_s": 15.0,
    "adapter_mix_fraction": 0.8,  # base + adapters mixed / base-only throughput, same server
    "label_fraction": 0.9,  # the labelling command / the service's best throughput, same images and prompt
}
LABEL_PROMPT = "cat ; dog"
LABEL_SERVICE_LEVELS = (16, 32, 64)
LABEL_SEQUENTIAL_IMAGES = 16


# ----------------------------------------------------------------------------------------- workload

def make_image(rng: random.Random, width: int, height: int) -> bytes:
    """A JPEG with a gradient and random shapes: compresses like a photo, unlike noise."""
    from PIL import Image, ImageDraw

    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(10, width // 2 + 11), y0 + rng.randrange(10, height // 2 + 11)
        color = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_workload(count: int, seed: int) -> list[dict]:
    """`count` requests cycling over a few distinct images (mixed sizes) and prompts; deterministic."""
    rng = random.Random(seed)
    images = [make_image(rng, *IMAGE_SIZES[i % len(IMAGE_SIZES)]) for i in range(min(count, DISTINCT_IMAGES))]
    work = []
    for i in range(count):
        data = images[i % len(images)]
        prompt = PROMPTS[rng.randrange(len(PROMPTS))]
        body = {"image_base64": base64.b64encode(data).decode("ascii"), "prompt": prompt, "mask_format": "rle"}
        work.append({"image": data, "prompt": prompt, "body": json.dumps(body).encode(),
                     "seed_prompt": seed_prompt(prompt)})
    return work


# ------------------------------------------------------------------------------------------ metrics

def scrape(url: str) -> dict:
    """The counters this benchmark reads from `/metrics`, summed over workers. Batch-size buckets are kept
    per metric (`(metric, le)`): the adaptive batcher's histogram and the step-level one have different
    bucket bounds, and a cumulative histogram is only differenced within its own bounds."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict = {"batch_buckets": Counter(), "batch_sum": 0.0, "batch_count": 0.0, "stages": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if (name.startswith(BATCH_METRIC) and labels.get("method_name") == "predict") or \
                    name.startswith(STEP_ROWS_METRIC):
                if name.endswith("_bucket"):
                    out["batch_buckets"][(family.name, labels["le"])] += value
                elif name.endswith("_sum"):
                    out["batch_sum"] += value
                elif name.endswith("_count"):
                    out["batch_count"] += value
            elif name.startswith("segmentation_stage_seconds") and name[-4:] in ("_sum", "ount"):
                stage = out["stages"].setdefault(labels["stage"], {"sum": 0.0, "count": 0.0})
                stage["sum" if name.endswith("_sum") else "count"] += value
            elif name in ("segmentation_generated_tokens_sum", "segmentation_generated_tokens_count",
                          "segmentation_objects_per_request_sum", "segmentation_objects_per_request_count",
                          f"{FIRST_STEP_METRIC}_sum", f"{FIRST_STEP_METRIC}_count"):
                out[name] = out.get(name, 0.0) + value
            elif name == f"{STEPS_METRIC}_total":
                key = f"{STEPS_METRIC}:{labels.get('path')}"
                out[key] = out.get(key, 0.0) + value
    return out


_SUMMED = ("segmentation_", "seg_engine_")  # plain sums and counts in a scrape, differenced as they are


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def metrics_delta(before: dict, after: dict) -> dict:
    """What changed between two scrapes: cumulative batch buckets, sums and counts."""
    return {
        "batch_buckets": {le: after["batch_buckets"][le] - before["batch_buckets"].get(le, 0.0)
                          for le in after["batch_buckets"]},
        "batch_sum": after["batch_sum"] - before["batch_sum"],
        "batch_count": after["batch_count"] - before["batch_count"],
        "stages": {stage: {k: v[k] - before["stages"].get(stage, {}).get(k, 0.0) for k in ("sum", "count")}
                   for stage, v in after["stages"].items()},
        **{k: after[k] - before.get(k, 0.0) for k in after if k.startswith(_SUMMED)},
    }


def add_deltas(deltas: list[dict]) -> dict:
    total: dict = {"batch_buckets": Counter(), "batch_sum": 0.0, "batch_count": 0.0, "stages": {}}
    for delta in deltas:
        total["batch_buckets"].update(delta["batch_buckets"])
        total["batch_sum"] += delta["batch_sum"]
        total["batch_count"] += delta["batch_count"]
        for stage, value in delta["stages"].items():
            into = total["stages"].setdefault(stage, {"sum": 0.0, "count": 0.0})
            into["sum"] += value["sum"]
            into["count"] += value["count"]
        for key, value in delta.items():
            if key.startswith(_SUMMED):
                total[key] = total.get(key, 0.0) + value
    return total


def batch_histogram(buckets: dict) -> dict[str, int]:
    """Batches per size range from cumulative `(metric, le)` bucket deltas: each metric is differenced
    within its own bounds, metrics that saw no batch are left out, ranges of the same name are added."""
    histogram: dict[str, int] = {}
    for metric in sorted({m for m, _ in buckets}):
        bounds = sorted((float(le), value) for (m, le), value in buckets.items() if m == metric)
        if not bounds or bounds[-1][1] <= 0:
            continue
        previous, lower = 0.0, 0
        for upper, value in bounds:
            if upper == float("inf"):
                label = f">{lower}"
            else:
                label = f"{lower + 1}-{int(upper)}" if upper > lower + 1 else str(int(upper))
            histogram[label] = histogram.get(label, 0) + int(round(value - previous))
            previous = value
            lower = lower if upper == float("inf") else int(upper)
    return histogram


def summarize_metrics(delta: dict) -> dict:
    """Batch-size histogram (per bucket, not cumulative), mean batch, mean seconds per stage, mean time to
    the first step and decode steps by path (step-level batching)."""
    histogram = batch_histogram(delta["batch_buckets"])
    batches = delta["batch_count"]
    stages = {stage: round(v["sum"] / v["count"], 5) for stage, v in delta["stages"].items() if v["count"]}

    def mean_of(name: str, digits: int = 2) -> float | None:
        value = _ratio(delta.get(name + "_sum", 0.0), delta.get(name + "_count", 0.0))
        return None if value is None else round(value, digits)

    return {
        "batches": int(batches),
        "batch_size_mean": round(delta["batch_sum"] / batches, 2) if batches else None,
        "batch_size_mode_bucket": max(histogram, key=histogram.get) if histogram else None,
        "batch_size_histogram": histogram,
        "stage_seconds_mean": stages,
        "generated_tokens_mean": mean_of("segmentation_generated_tokens"),
        "objects_mean": mean_of("segmentation_objects_per_request"),
        "time_to_first_step_s_mean": mean_of(FIRST_STEP_METRIC, 4),
        "steps_by_path": {key.split(":", 1)[1]: int(value) for key, value in sorted(delta.items())
                          if key.startswith(STEPS_METRIC + ":") and value},
    }


# --------------------------------------------------------------------------------------- load runs

def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


async def _clients(url: str, work: list[dict], concurrency: int, timeout: float, one) -> tuple[float, list[tuple]]:
    """`await one(client, item)` for every item of `work`, from `concurrency` clients sharing one httpx
    client: (wall seconds, the results in order of completion)."""
    results: list[tuple] = []
    queue = iter(work)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            for item in queue:
                results.append(await one(client, item))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, results


async def _drive(url: str, work: list[dict], concurrency: int, timeout: float,
                 seed: bool = False) -> tuple[float, list[tuple]]:
    """Send every request of `work` from `concurrency` clients; (wall seconds, [(status, seconds)]).

    `seed`: the original service's form upload (`prompt`, `image_file`) instead of our JSON body."""
    headers = {"Content-Type": "application/json"}

    async def one(client: httpx.AsyncClient, item: dict) -> tuple:
        start = time.perf_counter()
        try:
            if seed:
                response = await client.post("/segment", data={"prompt": item["seed_prompt"]},
                                             files={"image_file": ("image.jpg", item["image"], "image/jpeg")})
            else:
                response = await client.post("/segment", content=item["body"], headers=headers)
            status = str(response.status_code)
            if response.status_code == 200:
                response.json()  # the client pays for parsing the answer, as a real one does
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        return status, time.perf_counter() - start

    return await _clients(url, work, concurrency, timeout, one)


def stream_body(item: dict, model: str) -> bytes:
    """A workload request as an OpenAI-compatible streamed chat completion."""
    image = base64.b64encode(item["image"]).decode("ascii")
    return json.dumps({"model": model, "stream": True, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image}"}},
        {"type": "text", "text": item["prompt"]}]}]}).encode()


def openai_model(url: str) -> str | None:
    """The first model `/v1/models` lists, or None where the server has no OpenAI-compatible API."""
    try:
        response = httpx.get(url + "/v1/models", timeout=30)
    except httpx.HTTPError:
        return None
    if response.status_code != 200 or "application/json" not in response.headers.get("content-type", ""):
        return None
    return response.json()["data"][0]["id"]


async def _drive_stream(url: str, work: list[dict], concurrency: int, timeout: float,
                        model: str) -> tuple[float, list[tuple]]:
    """`_drive` through `/v1/chat/completions` with `stream: true`: (wall seconds, [(status, seconds to the
    first text piece, seconds to the end)])."""
    headers = {"Content-Type": "application/json"}

    async def one(client: httpx.AsyncClient, item: dict) -> tuple:
        start, first, status = time.perf_counter(), None, "no [DONE]"
        try:
            async with client.stream("POST", "/v1/chat/completions", content=stream_body(item, model),
                                     headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    status = str(response.status_code)
                else:
                    async for line in response.aiter_lines():
                        if line == "data: [DONE]":
                            status = "200"
                        elif first is None and line.startswith("data: "):
                            choices = json.loads(line[6:]).get("choices") or [{}]
                            if choices[0].get("delta", {}).get("content"):
                                first = time.perf_counter() - start
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        return status, first, time.perf_counter() - start

    return await _clients(url, work, concurrency, timeout, one)


def run_stream_level(url: str, work: list[dict], concurrency: int, timeout: float, model: str) -> dict:
    wall, results = asyncio.run(_drive_stream(url, work, concurrency, timeout, model))
    return {"wall_s": wall, "results": results}


def summarize_stream(concurrency: int, runs: list[dict]) -> dict:
    """Streamed requests of a level over its rounds: req/s, time to first token and to the end."""
    results = [r for run in runs for r in run["results"]]
    ok = [(first, total) for status, first, total in results if status == "200" and first is not None]
    rates = [sum(1 for status, *_ in run["results"] if status == "200") / run["wall_s"] for run in runs]
    firsts, totals = [first for first, _ in ok], [total for _, total in ok]
    return {
        "concurrency": concurrency, "requests": len(results), "ok": len(ok),
        "errors": dict(Counter(status for status, *_ in results if status != "200")),
        "requests_per_s": round(statistics.median(rates), 3) if rates else None,
        "time_to_first_token_s": {"p50": _round(percentile(firsts, 0.50)), "p90": _round(percentile(firsts, 0.90))},
        "latency_s": {"p50": _round(percentile(totals, 0.50)), "p90": _round(percentile(totals, 0.90))},
    }


def run_level(url: str, work: list[dict], concurrency: int, timeout: float, seed: bool = False) -> dict:
    """One concurrency level, once: wall time, per-request outcomes, the /metrics delta (none for `seed`)."""
    if seed:
        wall, results = asyncio.run(_drive(url, work, concurrency, timeout, seed=True))
        empty = {"batch_buckets": Counter(), "batch_sum": 0.0, "batch_count": 0.0, "stages": {}}
        return {"wall_s": wall, "results": results, "metrics": empty}
    before = scrape(url)
    wall, results = asyncio.run(_drive(url, work, concurrency, timeout))
    return {"wall_s": wall, "results": results, "metrics": metrics_delta(before, scrape(url))}


def _throughput(run: dict) -> float:
    return sum(1 for status, _ in run["results"] if status == "200") / run["wall_s"]


def summarize_level(concurrency: int, runs: list[dict]) -> dict:
    """A level over its rounds: throughput per round and its median, pooled latencies, summed metrics."""
    results = [r for run in runs for r in run["results"]]
    ok = [seconds for status, seconds in results if status == "200"]
    per_round = [_throughput(run) for run in runs]
    throughput = statistics.median(per_round)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "errors": dict(Counter(status for status, _ in results if status != "200")),
        "requests_per_s": round(throughput, 3),
        "images_per_s": round(throughput, 3),  # one image per /segment request
        "requests_per_s_rounds": [round(v, 3) for v in per_round],
        "wall_s_rounds": [round(run["wall_s"], 3) for run in runs],
        "latency_s": {
            "p50": _round(percentile(ok, 0.50)),
            "p90": _round(percentile(ok, 0.90)),
            "p95": _round(percentile(ok, 0.95)),
            "p99": _round(percentile(ok, 0.99)),
            "mean": _round(statistics.fmean(ok) if ok else None),
        },
        **summarize_metrics(add_deltas([run["metrics"] for run in runs])),
    }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


# ------------------------------------------------------------------------------------- servers

def export_commit(ref: str, cache_dir: Path) -> tuple[str, Path]:
    """The project's files at git commit `ref`, exported once into the cache (`git archive`: no
    worktree, the repository is left as it is); returns (short commit id, directory)."""
    commit = subprocess.run(["git", "rev-parse", "--short=7", f"{ref}^{{commit}}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    directory = cache_dir / f"source-{commit}"
    if not (directory / "service.py").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return commit, directory


def fixtures_for(size: str, cache_dir: Path, seed: int) -> Path:
    """DIR/paligemma and DIR/vae-oid.npz for `size`, written once into the cache."""
    from make_tiny_model import write_fixtures

    directory = cache_dir / f"{size}-seed{seed}"
    if not (directory / "vae-oid.npz").is_file():
        print(f"writing the {size} fixtures into {directory}", flush=True)
        write_fixtures(directory, size=size, seed=seed)
    return directory


@contextlib.contextmanager
def served(fixtures: Path, model_id: str, env: dict[str, str], target: str = "service:Segmentation",
           adapters: dict[str, Path] | None = None, source: Path = ROOT):
    """A `bentoml serve` on 127.0.0.1 with its own BENTOML_HOME; yields (server, seconds to /readyz).

    `adapters` (adapter id -> LoRA directory of the model) are imported and served too. `source`: the
    project tree whose service.py is served (another commit's, see `export_commit`).
    """
    with tempfile.TemporaryDirectory(prefix="seg-bench-") as tmp:
        home = Path(tmp)
        import_fixtures(home, fixtures, model_id)
        for adapter_id, directory in (adapters or {}).items():
            subprocess.run([sys.executable, str(ROOT / "scripts" / "import_models.py"), "--adapter", str(directory),
                            "--base", model_id, "--as", adapter_id],
                           env={**os.environ, "BENTOML_HOME": str(home)}, check=True, capture_output=True)
        if adapters:
            env = {**env, "SEG_ADAPTERS": ",".join(adapters)}
        start = time.perf_counter()
        server = start_server(home, {"SEG_MODELS": model_id, **env}, target=target, ready_timeout=600, cwd=source)
        ready = time.perf_counter() - start
        try:
            yield server, ready
        finally:
            kill_tree(server.process.pid)


# ---------------------------------------------------------------------------------- in-process work

class Baseline:
    """`Segmenter.predict` (batched generate + mask decode) in this process, on the model inputs the
    server's engine gets (decoded, EXIF-upright, resized pictures), with the server's token budgets."""

    def __init__(self, fixtures: Path, work: list[dict], max_new_tokens: int, objects_per_class: int):
        from segmentation import Segmenter
        from segmentation.model.images import model_input, open_image
        from segmentation.model.prompts import parse_prompt

        self.segmenter = Segmenter.from_pretrained(
            fixtures / "paligemma", fixtures / "vae-oid.npz", device="cpu",
            max_new_tokens=max_new_tokens, objects_per_class=objects_per_class,
        )
        self.segmenter.decoder.warmup()
        size = self.segmenter.image_size
        self.pictures = [model_input(open_image(w["image"]), size) for w in work]
        self.prompts = [parse_prompt(w["prompt"]) for w in work]

    def run(self, batch: int) -> dict:
        import torch

        predict = self.segmenter.predict
        full = max(1, len(self.pictures) // batch) * batch
        predict(self.pictures[:batch], self.prompts[:batch])  # warm-up
        traces = self.segmenter.decoder.trace_count
        tokens, times = [], []
        for start in range(0, full, batch):
            tick = time.perf_counter()
            predictions = predict(self.pictures[start:start + batch], self.prompts[start:start + batch])
            times.append(time.perf_counter() - tick)
            tokens += [p.generated_tokens for p in predictions]
        return {
            "batch_size": batch,
            "images": len(tokens),
            "seconds": round(sum(times), 3),
            "images_per_s": round(len(tokens) / sum(times), 3),
            "batch_seconds_median": round(statistics.median(times), 4),
            "generated_tokens_mean": round(statistics.fmean(tokens), 2),
            "torch_threads": torch.get_num_threads(),
            "decoder_recompiled": self.segmenter.decoder.trace_count != traces,
        }


def _timed(func, repeats: int) -> float:
    """Median seconds of `func()` over `repeats` runs (the median resists other load on the machine)."""
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        func()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def micro(fixtures: Path, seed: int, repeats: int = 200) -> dict:
    """Mask decode + paste + RLE per object at 640x480, and whether the decoder recompiles after warm-up."""
    import numpy as np

    from segmentation.model.encoding import mask_to_rle
    from segmentation.model.masks import paste_mask
    from segmentation.model.vae import BUCKETS, MaskDecoder

    width, height = 640, 480
    rng = np.random.default_rng(seed)
    decoder = MaskDecoder.from_npz(fixtures / "vae-oid.npz")
    tick = time.perf_counter()
    decoder.warmup()
    warmup_s = time.perf_counter() - tick
    traces = decoder.trace_count
    codes = rng.integers(0, 128, size=(64, 16), dtype=np.int32)
    decode_1 = _timed(lambda: decoder.decode(codes[:1]), repeats)
    decode_16 = _timed(lambda: decoder.decode(codes[:16]), max(20, repeats // 8)) / 16
    masks = decoder.decode(codes[:16])
    boxes = []
    for _ in range(16):  # boxes from a tenth of the image to most of it, as objects are
        w, h = int(rng.integers(64, width)), int(rng.integers(48, height))
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        boxes.append((x0, y0, x0 + w, y0 + h))
    pasted = [paste_mask(m, b, width, height) for m, b in zip(masks, boxes)]
    paste = _timed(lambda: [paste_mask(m, b, width, height) for m, b in zip(masks, boxes)], repeats // 4) / 16
    rle = _timed(lambda: [mask_to_rle(p) for p in pasted], repeats // 4) / 16
    for count in list(range(1, BUCKETS[-1] + 3)) + [BUCKETS[-1] * 2 + 5]:  # every size, chunking past 64
        decoder.decode(rng.integers(0, 128, size=(count, 16), dtype=np.int32))
    ms = 1000.0
    return {
        "image": [width, height],
        "decoder_warmup_s": round(warmup_s, 3),
        "decode_ms_per_object_batch1": round(decode_1 * ms, 3),
        "decode_ms_per_object_batch16": round(decode_16 * ms, 3),
        "paste_ms_per_object": round(paste * ms, 3),
        "rle_ms_per_object": round(rle * ms, 3),
        "total_ms_per_object_batch1": round((decode_1 + paste + rle) * ms, 3),
        "total_ms_per_object_batch16": round((decode_16 + paste + rle) * ms, 3),
        "trace_count_after_warmup": traces,
        "trace_count_after_all_sizes": decoder.trace_count,
        "recompiled_after_warmup": decoder.trace_count != traces,
    }


def engine_micro(fixtures: Path, batches: list[int], tokens: int, rounds: int) -> dict:
    """Prefill and decode-step times of each engine setting and of a bare forward loop, interleaved."""
    import torch
    from engine_timing import compare, cpu_has_native_bfloat16

    from segmentation.model.engine import PaliGemmaEngine

    directory = fixtures / "paligemma"
    engines = {
        "hf-generate": PaliGemmaEngine.from_pretrained(directory, device="cpu", generation="hf-generate"),
        "fast": PaliGemmaEngine.from_pretrained(directory, device="cpu"),
    }
    if cpu_has_native_bfloat16():
        engines["fast-bfloat16"] = PaliGemmaEngine.from_pretrained(directory, device="cpu", dtype="bfloat16")
    rows = compare(engines, batches, tokens, rounds=max(rounds, 1), bare="hf-generate",
                   log=lambda line: print(line, flush=True))
    return {"torch_threads": torch.get_num_threads(), "native_bfloat16": cpu_has_native_bfloat16(),
            "compiled_floor": "not measured: torch.compile recompiled on every decode step on this CPU "
                              "(60-230 s a step, docs/benchmarks.md)", "rows": rows}


def compare_configs(report: dict) -> dict:
    """Per level: req/s, generated tokens/s and errors of every configuration, and each one's speed-up
    over the engine before (`hf-generate`) and over the original service, where those ran."""
    table: dict = {}
    for name, config in report["configs"].items():
        for level in config.get("levels", []):
            tokens = config.get("generated_tokens_mean", level.get("generated_tokens_mean"))
            rate = level["requests_per_s"]
            table.setdefault(str(level["concurrency"]), {})[name] = {
                "requests_per_s": rate, "p50_s": level["latency_s"]["p50"], "generated_tokens_mean": tokens,
                "tokens_per_s": round(rate * tokens, 2) if tokens is not None else None,
                "errors": sum(level["errors"].values()), "requests": level["requests"],
            }
    for row in table.values():
        for name, figures in row.items():
            baselines = ["hf-generate", "fast-batches", "original", *(n for n in row if n.startswith("main@"))]
            for other in baselines:
                if other in row and other != name and row[other]["requests_per_s"]:
                    figures[f"x_{other}"] = round(figures["requests_per_s"] / row[other]["requests_per_s"], 2)
                    if row[other]["p50_s"]:
                        figures[f"p50_x_{other}"] = round(figures["p50_s"] / row[other]["p50_s"], 2)
    return table


def readyz_runs(cache_dir: Path, seed: int, runs: int, env: dict[str, str]) -> dict:
    fixtures = fixtures_for("tiny", cache_dir, seed)
    seconds = []
    for _ in range(runs):
        with served(fixtures, "demo/paligemma2-tiny-random", env) as (_, ready):
            seconds.append(round(ready, 2))
        print(f"[readyz] tiny model ready in {seconds[-1]} s", flush=True)
    return {"model": "tiny", "seconds": seconds, "median_s": round(statistics.median(seconds), 2),
            "poll_interval_s": 0.5}


def adapter_mix(count: int, base: str, adapters: list[str], share: float | None) -> list[str]:
    """The model of each of `count` requests: round-robin over the base and the adapters (`share` None), or a
    fraction `share` on the adapters (evenly interleaved, round-robin among them) and the rest on the base."""
    if share is None:
        models = [base, *adapters]
        return [models[i % len(models)] for i in range(count)]
    chosen, next_adapter = [], 0
    for i in range(count):
        if math.floor((i + 1) * share) > math.floor(i * share):
            chosen.append(adapters[next_adapter % len(adapters)])
            next_adapter += 1
        else:
            chosen.append(base)
    return chosen


def adapters_comparison(fixtures: Path, model_id: str, work: list[dict], env: dict[str, str], count: int,
                        concurrency: int, rounds: int, warmup: int, timeout: float, share: float | None = None,
                        source: Path = ROOT, label: str = "adapters") -> dict:
    """Base-only against base + `count` random adapters mixed (a fraction `share` of the requests on the
    adapters), on one server of the tree `source` (see the module docstring)."""
    from lora import write_random_adapter  # tests/lora.py

    adapters = {}
    for index in range(count):
        directory = fixtures / f"lora-{index}"
        if not (directory / "adapter_config.json").is_file():
            write_random_adapter(fixtures / "paligemma", directory, seed=index + 1)
        adapters[f"bench/lora-{index}"] = directory
    mixed = adapter_mix(len(work), model_id, list(adapters), share)
    loads = {"base_only": work, "mixed": [{**item, "body": json.dumps({**json.loads(item["body"]), "model": m})
                                           .encode()} for item, m in zip(work, mixed)]}
    runs: dict[str, list] = {name: [] for name in loads}
    with served(fixtures, model_id, env, adapters=adapters, source=source) as (server, ready):
        print(f"[{label}] {model_id} + {count} adapters ready in {ready:.1f} s at {server.url}", flush=True)
        asyncio.run(_drive(server.url, loads["mixed"][:warmup], min(warmup, concurrency), timeout))
        for round_index in range(rounds):
            for name in (loads if round_index % 2 == 0 else reversed(loads)):
                runs[name].append(run_level(server.url, loads[name], concurrency, timeout))
                one = summarize_level(concurrency, runs[name][-1:])
                print(f"[{label} {name} round {round_index + 1}] c={concurrency} {one['requests_per_s']:.2f} req/s  "
                      f"batch mean {one['batch_size_mean']}  errors {one['errors'] or 0}", flush=True)
    ratios = [r for r in (_ratio(_throughput(m), _throughput(b)) for m, b in zip(runs["mixed"], runs["base_only"]))
              if r is not None]
    return {
        "adapters": count, "concurrency": concurrency,
        "adapter_share": round(sum(m != model_id for m in mixed) / len(mixed), 3),
        "levels": {name: summarize_level(concurrency, rs) for name, rs in runs.items()},
        "ratio": _round(statistics.median(ratios), 3) if ratios else None, "rounds": [round(r, 3) for r in ratios],
    }


# ------------------------------------------------------------------------------------------- report

def label_bench(url: str, work: list[dict], timeout: float) -> dict:
    """The labelling command's images/s on a folder of the workload's images, beside the service's
    best images/s on the same images and prompt (raw requests) and a sequential client loop."""
    from segmentation.client import AsyncRemoteSegmenter, RemoteSegmenter
    from segmentation.data.labelling import DEFAULT_CONCURRENCY, label_folder

    with tempfile.TemporaryDirectory(prefix="seg-label-bench-") as tmp:
        folder, out = Path(tmp) / "images", Path(tmp) / "labels"
        folder.mkdir()
        for index, item in enumerate(work):
            (folder / f"img{index:05d}.jpg").write_bytes(item["image"])
        same = [{**item, "body": json.dumps({"image_base64": base64.b64encode(item["image"]).decode("ascii"),
                                             "prompt": LABEL_PROMPT, "mask_format": "rle"}).encode()}
                for item in work]
        service = {}
        for concurrency in LABEL_SERVICE_LEVELS:
            wall, results = asyncio.run(_drive(url, same, concurrency, timeout))
            service[concurrency] = sum(1 for status, _ in results if status == "200") / wall
            print(f"[label] service c={concurrency}: {service[concurrency]:.2f} images/s", flush=True)
        start = time.perf_counter()
        summary = label_folder(folder, out, LABEL_PROMPT, AsyncRemoteSegmenter(url, timeout_s=timeout),
                               remote=True, progress=False)
        label_wall = time.perf_counter() - start
        labelled = summary.labelled / label_wall
        print(f"[label] labelling command c={DEFAULT_CONCURRENCY}: {labelled:.2f} images/s "
              f"({summary.labelled} images, {len(summary.failed)} failed, {summary.objects} objects)", flush=True)
        # One image after another is slow: time the first few only.
        start = time.perf_counter()
        with RemoteSegmenter(url, timeout_s=timeout) as client:
            for item in work[:LABEL_SEQUENTIAL_IMAGES]:
                client.segment_one(item["image"], LABEL_PROMPT)
        sequential = len(work[:LABEL_SEQUENTIAL_IMAGES]) / (time.perf_counter() - start)
        print(f"[label] sequential RemoteSegmenter loop: {sequential:.2f} images/s", flush=True)
    best = max(service.values())
    return {
        "prompt": LABEL_PROMPT, "images": len(work), "concurrency": DEFAULT_CONCURRENCY,
        "label_images_per_s": round(labelled, 3), "label_failed": len(summary.failed),
        "service_images_per_s": {str(c): round(v, 3) for c, v in service.items()},
        "service_best_images_per_s": round(best, 3),
        "sequential_images_per_s": round(sequential, 3),
        "fraction_of_service": _round(_ratio(labelled, best), 3),
        "speedup_over_sequential": _round(_ratio(labelled, sequential), 3),
    }


def combine_label_rounds(rounds: list[dict]) -> dict:
    """The label figures over rounds: each figure's median, and the per-round values of the ratios."""
    figures = ("label_images_per_s", "service_best_images_per_s", "sequential_images_per_s",
               "fraction_of_service", "speedup_over_sequential")
    combined = {**rounds[-1], **{name: _round(statistics.median(r[name] for r in rounds), 3) for name in figures}}
    combined["rounds"] = [{name: r[name] for name in figures} for r in rounds]
    return combined


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        memory = round(int(first.split()[1]) / 1024 / 1024, 1)
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gib": memory, "python": platform.python_version(),
            "platform": platform.platform()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("bentoml", "torch", "transformers", "jax", "numpy", "pillow", "httpx"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def evaluate(report: dict) -> dict:
    """Each target: the measured value, the target, whether it is met."""
    targets = {}
    if report.get("batching_speedup") is not None:
        value = report["batching_speedup"]["ratio"]
        targets["batching_speedup"] = {"value": value, "target": f">= {TARGETS['batching_speedup']}",
                                       "met": value is not None and value >= TARGETS["batching_speedup"]}
    if report.get("baseline"):
        value = report["baseline"].get("service_fraction")
        targets["service_fraction"] = {"value": value, "target": f">= {TARGETS['service_fraction']}",
                                       "met": value is not None and value >= TARGETS["service_fraction"]}
    if report.get("micro"):
        value = report["micro"]["total_ms_per_object_batch1"]
        targets["decode_paste_rle_ms"] = {"value": value, "target": f"<= {TARGETS['decode_paste_rle_ms']}",
                                          "met": value <= TARGETS["decode_paste_rle_ms"]}
        recompiled = report["micro"]["recompiled_after_warmup"] or (report.get("baseline") or {}).get(
            "decoder_recompiled", False)
        targets["no_recompilation"] = {"value": not recompiled, "target": True, "met": not recompiled}
    if report.get("adapters"):
        value = report["adapters"]["ratio"]
        targets["adapter_mix_fraction"] = {"value": value, "target": f">= {TARGETS['adapter_mix_fraction']}",
                                           "met": value is not None and value >= TARGETS["adapter_mix_fraction"]}
    if report.get("label"):
        value = report["label"]["fraction_of_service"]
        targets["label_fraction"] = {"value": value, "target": f">= {TARGETS['label_fraction']}",
                                     "met": value is not None and value >= TARGETS["label_fraction"]}
    if report.get("readyz"):
        value = report["readyz"]["median_s"]
        targets["readyz_tiny_s"] = {"value": value, "target": f"<= {TARGETS['readyz_tiny_s']}",
                                    "met": value <= TARGETS["readyz_tiny_s"]}
    return targets


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=80)
    for name, config in report["configs"].items():
        levels = config["levels"]
        xs = [lv["concurrency"] for lv in levels]
        left.plot(xs, [lv["requests_per_s"] for lv in levels], marker="o", label=name)
        right.plot(xs, [lv["latency_s"]["p95"] for lv in levels], marker="o", label=name)
    if report.get("baseline"):
        left.axhline(report["baseline"]["images_per_s"], color="grey", linestyle="--",
                     label=f"raw batch {report['baseline']['batch_size']}")
    for axis, title in ((left, "throughput (req/s)"), (right, "p95 latency (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    left.legend(fontsize=8)
    figure.suptitle(f"{report['settings']['size'] or 'server'} model, "
                    f"{report['settings']['max_new_tokens']} new tokens max, {report['machine']['nproc']} CPUs",
                    fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="drive this running server")
    where.add_argument("--start", action="store_true", help="start the server(s) on random fixtures")
    parser.add_argument("--size", choices=("tiny", "medium", "3b-224", "3b-448"), default="medium",
                        help="fixture size with --start (default medium)")
    parser.add_argument("--fixtures", type=Path, help="use these fixtures (DIR/paligemma, DIR/vae-oid.npz)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".fixtures" / "bench",
                        help="where --start writes fixtures once (default .fixtures/bench)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--stream-levels", default="1,16",
                        help="client counts (of --concurrency) whose requests are also streamed through "
                             "/v1/chat/completions: time to first token; empty: none")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--warmup", type=int, default=8, help="unmeasured requests per server before measuring")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every level on every server, interleaved")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="SEG_MAX_NEW_TOKENS for --start")
    parser.add_argument("--objects-per-class", type=int, default=5, help="SEG_OBJECTS_PER_CLASS for --start")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra server environment with --start (repeatable)")
    parser.add_argument("--compare-batching", action="store_true",
                        help="also run a server with SEG_MAX_BATCH_SIZE=1 and print the throughput ratio")
    parser.add_argument("--compare-adapters", type=int, default=0, metavar="N",
                        help="also serve N random LoRA adapters and compare base-only with mixed load")
    parser.add_argument("--adapter-share", type=float, metavar="F",
                        help="with --compare-adapters: the fraction of mixed requests sent to the adapters "
                             "(default: round-robin over the base and the adapters)")
    parser.add_argument("--adapters-ref", metavar="REF",
                        help="with --compare-adapters: the same comparison on the service at git commit REF too")
    parser.add_argument("--baseline", action="store_true", help="raw batched Segmenter.predict, no server")
    parser.add_argument("--baseline-batch", type=int, help="baseline batch size (default: the server's mean)")
    parser.add_argument("--micro", action="store_true", help="decode + paste + RLE per object; recompilation")
    parser.add_argument("--readyz", type=int, nargs="?", const=2, default=0, metavar="RUNS",
                        help="time a tiny-model server from start to /readyz green (RUNS times, default 2)")
    parser.add_argument("--label", action="store_true",
                        help="the labelling command's images/s vs the service's best and a sequential loop")
    parser.add_argument("--compare-schedulers", action="store_true",
                        help="also serve the service before step-level batching (SEG_ENGINE=fast, "
                             "SEG_SCHEDULER=batches) beside the default (graph engine, step-level batching)")
    parser.add_argument("--compare-engines", action="store_true",
                        help="also serve SEG_ENGINE=hf-generate (and SEG_DTYPE=bfloat16 where the CPU has it)")
    parser.add_argument("--engine-micro", action="store_true",
                        help="prefill and decode-step times per engine setting beside a bare forward loop")
    parser.add_argument("--engine-batches", default="1,8", help="batch sizes for --engine-micro")
    parser.add_argument("--engine-tokens", type=int, default=40, help="tokens per row for --engine-micro")
    parser.add_argument("--baseline-ref", metavar="REF",
                        help="also serve the service as it was at git commit REF (exported into --cache-dir), "
                             "with the same settings, as configuration main@REF")
    parser.add_argument("--seed-dir", type=Path,
                        help="a checkout of the original FastAPI service to serve and measure beside ours")
    parser.add_argument("--seed-venv", type=Path, default=ROOT / ".fixtures" / "seed-venv",
                        help="scratch virtual environment for --seed-dir (installed once)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks-out" / "benchmark.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks-out" / "benchmark.png")
    args = parser.parse_args(argv)
    if not (args.url or args.start or args.baseline or args.micro or args.readyz or args.engine_micro):
        parser.error("give --url or --start (or only --baseline / --micro / --readyz with --fixtures)")
    if args.label and not (args.url or args.start):
        parser.error("--label drives a server: use it with --url or --start")
    for flag in ("compare_batching", "compare_adapters", "compare_engines", "compare_schedulers", "seed_dir",
                 "baseline_ref"):
        if getattr(args, flag) and not args.start:
            parser.error(f"--{flag.replace('_', '-')} starts its servers: use it with --start")
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    stream_levels = [c for c in levels if str(c) in {v.strip() for v in args.stream_levels.split(",")}]
    extra_env = dict(item.split("=", 1) for item in args.env)
    server_env = {"SEG_MAX_NEW_TOKENS": str(args.max_new_tokens),
                  "SEG_OBJECTS_PER_CLASS": str(args.objects_per_class), **extra_env}

    fixtures = args.fixtures
    if fixtures is None and (args.start or args.baseline or args.micro or args.engine_micro):
        if args.url and args.baseline:
            parser.error("--baseline with --url needs --fixtures: the model the server runs")
        fixtures = fixtures_for(args.size, args.cache_dir, args.seed)
    work = make_workload(args.requests, args.seed)
    report: dict = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["scripts/benchmark.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "size": args.size if args.start else None, "url": args.url, "requests_per_level": args.requests,
            "concurrency": levels, "stream_levels": stream_levels,
            "max_new_tokens": args.max_new_tokens if args.start else None,
            "objects_per_class": args.objects_per_class if args.start else None, "seed": args.seed,
            "server_env": server_env if args.start else None, "image_sizes": IMAGE_SIZES, "prompts": PROMPTS,
        },
        "configs": {},
    }

    # Every server starts first (one at a time, so each start is timed alone); then each round runs
    # every level on every server back to back (order alternating per round), so that other load on
    # the machine falls on all configurations alike.
    # (name, what runs, extra environment): "seed" runs the original service from --seed-dir.
    from engine_timing import cpu_has_native_bfloat16

    configs: list[tuple[str, str | None, dict]] = [("server", None, {})] if args.url else \
        [("adaptive", "service:Segmentation", {})]
    if args.start and args.compare_batching:
        # SEG_MAX_BATCH_SIZE=1 stops service.py at import (BentoML wants > 1): UNBATCHED serves batches of one.
        configs.append(("max_batch_size_1", UNBATCHED, {}))
    if args.start and args.compare_schedulers:
        # The service before step-level batching: the eager loop in BentoML's adaptive batches.
        configs.append(("fast-batches", "service:Segmentation", {"SEG_ENGINE": "fast", "SEG_SCHEDULER": "batches"}))
    if args.start and args.compare_engines:
        configs.append(("hf-generate", "service:Segmentation", {"SEG_ENGINE": "hf-generate",
                                                                "SEG_SCHEDULER": "batches"}))
        if cpu_has_native_bfloat16():
            configs.append(("fast-bfloat16", "service:Segmentation", {"SEG_DTYPE": "bfloat16", "SEG_ENGINE": "fast",
                                                                      "SEG_SCHEDULER": "batches"}))
    sources: dict[str, Path] = {}  # configuration -> the tree it serves, where not this one
    if args.start and args.baseline_ref:
        commit, sources[f"main@{args.baseline_ref}"] = export_commit(args.baseline_ref, args.cache_dir)
        configs.append((f"main@{args.baseline_ref}", "service:Segmentation", {}))
        report["settings"]["baseline_commit"] = commit
    if args.start and args.seed_dir:
        configs.append(("original", "seed", {}))
    configs = configs if (args.url or args.start) else []
    runs: dict[str, dict[int, list]] = {name: {c: [] for c in levels} for name, _, _ in configs}
    stream_runs: dict[str, dict[int, list]] = {name: {c: [] for c in stream_levels} for name, _, _ in configs}
    stream_models: dict[str, str | None] = {}
    top = max(levels)
    raw_rounds: list[dict] = []
    label_rounds: list[dict] = []
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, target, env in configs:
            if target is None:
                urls[name] = args.url
                report["configs"][name] = {"url": args.url}
                continue
            if target == "seed":
                python = ensure_venv(args.seed_dir, args.seed_venv)
                image_size = json.loads((fixtures / "paligemma" / "config.json").read_text())["vision_config"][
                    "image_size"]
                url, ready = stack.enter_context(served_seed(args.seed_dir, python, fixtures, image_size))
                print(f"[{name}] the original service ready in {ready:.1f} s at {url}", flush=True)
                urls[name] = url
                report["configs"][name] = {"target": f"{args.seed_dir} (uvicorn app.main:app)",
                                           "ready_s": round(ready, 2), "max_new_tokens": 100}
                continue
            model_id = f"demo/paligemma2-{args.size}-random"
            server, ready = stack.enter_context(served(fixtures, model_id, {**server_env, **env}, target,
                                                       source=sources.get(name, ROOT)))
            print(f"[{name}] {model_id} ready in {ready:.1f} s at {server.url}", flush=True)
            urls[name] = server.url
            report["configs"][name] = {"target": target, "env": {**server_env, **env}, "ready_s": round(ready, 2)}
            if name in sources:
                report["configs"][name]["source"] = f"git commit {report['settings']['baseline_commit']}"
        for name, url in urls.items():
            if args.warmup:
                asyncio.run(_drive(url, work[:args.warmup], min(args.warmup, top), args.timeout,
                                   seed=name == "original"))
            stream_models[name] = openai_model(url) if stream_levels and name != "original" else None
        bench = Baseline(fixtures, work, args.max_new_tokens, args.objects_per_class) if args.baseline else None
        for round_index in range(args.rounds):
            order = list(urls) if round_index % 2 == 0 else list(reversed(urls))
            for concurrency in levels:
                for name in order:
                    run = run_level(urls[name], work, concurrency, args.timeout, seed=name == "original")
                    runs[name][concurrency].append(run)
                    one = summarize_level(concurrency, [run])
                    print(f"[{name} round {round_index + 1}] c={concurrency:<3} {one['requests_per_s']:7.2f} req/s  "
                          f"p50 {one['latency_s']['p50']}s  p95 {one['latency_s']['p95']}s  "
                          f"batch mean {one['batch_size_mean']}  tokens {one['generated_tokens_mean']}  "
                          f"errors {one['errors'] or 0}", flush=True)
                    if concurrency in stream_levels and stream_models[name]:
                        streamed = run_stream_level(urls[name], work, concurrency, args.timeout, stream_models[name])
                        stream_runs[name][concurrency].append(streamed)
                        one = summarize_stream(concurrency, [streamed])
                        print(f"[{name} round {round_index + 1}] c={concurrency:<3} streamed {one['requests_per_s']} "
                              f"req/s  first token p50 {one['time_to_first_token_s']['p50']}s  "
                              f"p90 {one['time_to_first_token_s']['p90']}s  errors {one['errors'] or 0}", flush=True)
            if args.label:
                label_rounds.append(label_bench(next(iter(urls.values())), work, args.timeout))
            if bench is not None:
                served_top = summarize_level(top, [runs[configs[0][0]][top][-1]]) if configs else {}
                batch = args.baseline_batch or max(1, round(served_top.get("batch_size_mean") or top))
                raw = bench.run(batch)
                if served_top:
                    raw["service_requests_per_s"] = served_top["requests_per_s"]
                    raw["service_fraction"] = _round(_ratio(served_top["requests_per_s"], raw["images_per_s"]), 3)
                raw_rounds.append(raw)
                print(f"[baseline round {round_index + 1}] batch {batch}: {raw['images_per_s']} images/s raw; "
                      f"service / raw {raw.get('service_fraction')}", flush=True)

    for name, _, _ in configs:
        report["configs"][name]["levels"] = [summarize_level(c, runs[name][c]) for c in levels]
        for level in report["configs"][name]["levels"]:
            if stream_runs[name].get(level["concurrency"]):
                level["stream"] = summarize_stream(level["concurrency"], stream_runs[name][level["concurrency"]])
    if "original" in urls:
        # Its answers carry no token count: count them with its own generate call on the same inputs.
        pairs = list(dict.fromkeys((w["image"], w["prompt"]) for w in work))
        counts = dict(zip(pairs, count_tokens(args.seed_dir, ensure_venv(args.seed_dir, args.seed_venv),
                                              fixtures, image_size, pairs)))
        report["configs"]["original"]["generated_tokens_mean"] = round(
            statistics.fmean(counts[(w["image"], w["prompt"])] for w in work), 2)
    report["comparison"] = compare_configs(report)

    if args.compare_batching:
        ratios = [_ratio(_throughput(a), _throughput(b))
                  for a, b in zip(runs["adaptive"][top], runs["max_batch_size_1"][top])]
        ratios = [r for r in ratios if r is not None]
        report["batching_speedup"] = {"concurrency": top, "ratio": _round(statistics.median(ratios), 3)
                                      if ratios else None, "rounds": [round(r, 3) for r in ratios]}
        print(f"adaptive batching / max_batch_size=1 at {top} clients: {report['batching_speedup']['ratio']}x "
              f"(rounds {report['batching_speedup']['rounds']})")

    if label_rounds:
        report["label"] = combine_label_rounds(label_rounds)
        print(f"[label] median over {len(label_rounds)} rounds: {json.dumps(report['label'])}", flush=True)

    if raw_rounds:
        fractions = [r["service_fraction"] for r in raw_rounds if r.get("service_fraction") is not None]
        report["baseline"] = {
            **raw_rounds[-1],
            "images_per_s": round(statistics.median(r["images_per_s"] for r in raw_rounds), 3),
            "images_per_s_rounds": [r["images_per_s"] for r in raw_rounds],
            "service_fraction": round(statistics.median(fractions), 3) if fractions else None,
            "service_fraction_rounds": fractions,
            "decoder_recompiled": any(r["decoder_recompiled"] for r in raw_rounds),
        }

    if args.compare_adapters:
        report["adapters"] = adapters_comparison(
            fixtures, f"demo/paligemma2-{args.size}-random", work, server_env, args.compare_adapters, top,
            args.rounds, args.warmup, args.timeout, share=args.adapter_share)
        print(f"mixed base + {args.compare_adapters} adapters / base only at {top} clients: "
              f"{report['adapters']['ratio']}x (rounds {report['adapters']['rounds']})", flush=True)
        if args.adapters_ref:
            commit, source = export_commit(args.adapters_ref, args.cache_dir)
            report["adapters_ref"] = {"commit": commit, **adapters_comparison(
                fixtures, f"demo/paligemma2-{args.size}-random", work, server_env, args.compare_adapters, top,
                args.rounds, args.warmup, args.timeout, share=args.adapter_share, source=source,
                label=f"adapters main@{commit}")}
            print(f"main@{commit}: mixed / base only at {top} clients: {report['adapters_ref']['ratio']}x "
                  f"(rounds {report['adapters_ref']['rounds']})", flush=True)

    if args.engine_micro:
        report["engine_micro"] = engine_micro(fixtures, [int(b) for b in args.engine_batches.split(",")],
                                              args.engine_tokens, args.rounds)
    if args.micro:
        report["micro"] = micro(fixtures, args.seed)
        print(f"[micro] {json.dumps(report['micro'])}", flush=True)
    if args.readyz:
        report["readyz"] = readyz_runs(args.cache_dir, args.seed, args.readyz, server_env)

    report["targets"] = evaluate(report)
    for name, target in report["targets"].items():
        verdict = "met" if target["met"] else "NOT met"
        print(f"target {name}: {target['value']} (target {target['target']}) -> {verdict}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if report["configs"] and args.plot:
        plot(report, args.plot)
    print(f"wrote {args.out}" + (f" and {args.plot}" if report["configs"] and args.plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
