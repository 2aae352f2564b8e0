#!/usr/bin/env python
"""The GPU benchmark in one run (make bench-gpu; under 8 minutes on one H100, no network):

1. writes the `3b-448` fixture (paligemma2-3b-mix-448's real shapes and vocabulary, random weights,
   drawn on the GPU and saved in bfloat16) once into `--cache-dir`;
2. raw generation at batch 1/8/16/32 with the graph engine (static cache, device grammar, one CUDA
   graph per bucket), the fast loop and transformers' `generate` (`hf-generate`): prefill, decode step,
   generated tokens per second, peak GPU memory; the graph engine's capture time and reserved buffers;
   and the floor: the bare forward of the same static step (no grammar, no bookkeeping) captured and
   replayed;
3. the service (`bentoml serve`, `SEG_DEVICE=cuda`) at 1/16/64 clients on a mixed-length workload
   (1 to 4 classes a prompt), once as before (fast engine, adaptive batches) and once with the graph
   engine and step-level batching: req/s, latency, errors, and the GPU memory in use (nvidia-smi).

    .venv/bin/python scripts/bench_gpu.py --out benchmarks-out/gpu.json
    # the test suite runs it tiny on the CPU so it cannot rot:
    .venv/bin/python scripts/bench_gpu.py --size tiny --device cpu --batches 1,2 --clients 1,2 --tokens 24

Random weights write until their budget: `--tokens` is each row's forced token count (raw) and the
server's `SEG_MAX_NEW_TOKENS`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts", ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def fixtures(size: str, cache_dir: Path, device: str, log) -> Path:
    """DIR/paligemma and DIR/vae-oid.npz for `size`, written once (bfloat16 weights on a GPU)."""
    from make_tiny_model import write_fixtures

    on_gpu = device.startswith("cuda")
    directory = cache_dir / f"{size}-{'gpu-bf16' if on_gpu else 'cpu'}"
    if not (directory / "vae-oid.npz").is_file():
        start = time.perf_counter()
        # Random VAE weights: the mask decoder costs the same, and no training runs on the GPU host.
        write_fixtures(directory, size=size, vae="random", device=device, dtype="bfloat16" if on_gpu else "float32")
        log(f"[fixture] wrote {size} into {directory} in {time.perf_counter() - start:.1f}s")
    return directory


class GpuMemory:
    """Peak `memory.used` of GPU 0 from nvidia-smi, sampled every half second (None without nvidia-smi)."""

    def __init__(self):
        self.peak_mib: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.peak_mib = max(self.peak_mib or 0, int(out.strip().splitlines()[0]))
            self._stop.wait(0.5)

    def __enter__(self) -> GpuMemory:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def raw_generation(directory: Path, device: str, batches: list[int], tokens: int, log) -> dict:
    """Each batch size with both generation loops (interleaved): prefill, step, tokens/s, peak memory."""
    import torch

    engines = load_engines(directory, device, batches, tokens, log)
    rows, _ = measure_engines(engines, batches, tokens, log)
    floor = [floor_step(engines["graph"].decoder, batch, log) for batch in batches]
    del engines
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"load_s": ENGINE_SETUP["load_s"], "tokens_per_row": tokens, "graph": ENGINE_SETUP["graph"],
            "rows": rows, "floor": floor}


ENGINE_SETUP: dict = {}  # what load_engines measured last: load seconds, the graph engine's setup


def load_engines(directory: Path, device: str, batches: list[int], tokens: int, log,
                 buckets: tuple[int, ...] | None = None) -> dict:
    """The model at DIR/paligemma once, driven by three engines: `graph` (buckets: `buckets`, default the
    batch sizes; its buffers reserved and graphs captured here), `fast` and `hf-generate`. Records the load
    time and the graph engine's setup (capture time and memory per bucket) in ENGINE_SETUP."""
    from segmentation.model.engine import PaliGemmaEngine
    from segmentation.model.graph.decoder import GraphSettings

    start = time.perf_counter()
    fast = PaliGemmaEngine.from_pretrained(directory / "paligemma", device=device)
    ENGINE_SETUP["load_s"] = round(time.perf_counter() - start, 2)
    # One model in memory: the other engines drive the same weights.
    before = PaliGemmaEngine(fast.model, fast.processor, generation="hf-generate")
    graph = PaliGemmaEngine(fast.model, fast.processor, generation="graph", max_new_tokens=tokens,
                            graph=GraphSettings(buckets=tuple(sorted(buckets or batches))))
    start = time.perf_counter()
    decoder = graph.decoder  # buffers reserved, graphs captured
    ENGINE_SETUP["graph"] = {
        "setup_s": round(time.perf_counter() - start, 2), "capture_s": round(decoder.capture_seconds, 2),
        "graphs": len(decoder.graphs), "reserved_mib": round(decoder.reserved_bytes() / 2**20, 2),
        "cache_length": decoder.length, "buckets": list(decoder.buckets),
        "captured": sorted(decoder.graphs), "failures": {str(b): r for b, r in decoder.capture_failures.items()},
        "per_bucket": {str(b): r for b, r in sorted(decoder.capture_report.items())},
    }
    log(f"[graph] {ENGINE_SETUP['graph']}")
    return {"graph": graph, "fast": fast, "hf-generate": before}


def measure_engines(engines: dict, batches: list[int], tokens: int, log) -> tuple[list[dict], dict]:
    """Each batch size through each engine (forced budgets, the same inputs): one row per (engine, batch)
    with prefill, step, tokens/s and peak memory; and the generations, by (engine, batch)."""
    import torch
    from engine_timing import sample_batch, time_engine

    on_gpu = next(iter(engines.values())).device.type == "cuda"
    rows, generations = [], {}
    for batch in batches:
        images, prompts = sample_batch(batch)
        for name, engine in engines.items():
            engine.generate(images[:1], prompts[:1], max_new_tokens=[4])  # warm-up
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            try:
                figures = time_engine(engine, images, prompts, tokens)
            except torch.OutOfMemoryError as exc:
                rows.append({"engine": name, "batch": batch, "error": f"out of memory: {exc}"[:300]})
                log(f"[raw {name} b={batch}] out of memory")
                torch.cuda.empty_cache()
                continue
            generations[(name, batch)] = figures["generations"]
            row = {"engine": name, "batch": batch, "prefill_s": round(figures["prefill_s"], 4),
                   "prefill_ms_per_image": round(figures["prefill_s"] * 1000 / batch, 2),
                   "step_ms": None if figures["step_ms"] is None else round(figures["step_ms"], 3),
                   "total_s": round(figures["total_s"], 3), "tokens": figures["tokens"],
                   "tokens_per_s": round(figures["tokens"] / figures["total_s"], 1),
                   "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None}
            rows.append(row)
            log(f"[raw {name} b={batch}] prefill {row['prefill_s']}s step {row['step_ms']}ms "
                f"{row['tokens_per_s']} tokens/s peak {row['peak_memory_gib']} GiB")
    return rows, generations


def floor_step(decoder, batch: int, log, repeats: int = 50) -> dict:
    """The bare forward of the graph engine's step (embedding, layers over the static cache, logits; no
    grammar, no outputs) at `batch`, captured as a CUDA graph and replayed: what a step cannot beat."""
    import torch

    with torch.inference_mode():
        decoder.reset()
        if decoder.device.type == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                decoder._forward(batch)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                decoder._forward(batch)
            run = graph.replay
        else:
            def run():
                decoder._forward(batch)
        run()
        if decoder.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        if decoder.device.type == "cuda":
            torch.cuda.synchronize()
    row = {"batch": batch, "step_ms": round((time.perf_counter() - start) * 1000 / repeats, 3)}
    log(f"[floor b={batch}] bare captured forward {row['step_ms']}ms")
    return row


def service_env(device: str, tokens: int, max_batch: int, clients: list[int]) -> dict[str, str]:
    """The server settings both service runs share. SEG_MAX_CONCURRENCY is what one public worker must
    hold on its own: BentoML gives each worker ceil(N / workers) of it (`_bentoml_impl/server/app.py`) and
    connections do not spread evenly, so N = the clients times the workers keeps 429s out of the figures."""
    from segmentation.serving.settings import default_api_workers

    workers = int(os.environ.get("SEG_API_WORKERS") or default_api_workers())
    return {"SEG_DEVICE": device, "SEG_MAX_NEW_TOKENS": str(tokens), "SEG_MAX_BATCH_SIZE": str(max_batch),
            "SEG_MAX_CONCURRENCY": str(max(clients) * workers * 2), "SEG_MAX_LATENCY_MS": "120000",
            "JAX_PLATFORMS": "cpu"}


def service(directory: Path, device: str, clients: list[int], requests: int, tokens: int, max_batch: int,
            log, configs: list[str] | None = None, warmup: int = 8, extra_env: dict | None = None) -> dict:
    """The served API on this model at each client count: req/s, latency, batches, GPU memory.

    `configs` picks among "fast, adaptive batches" and "graph, step-level batching" (default: both);
    each level sends max(`requests`, clients) requests; `extra_env` adds server settings."""
    from benchmark import make_workload, run_level, served, summarize_level

    common = {**service_env(device, tokens, max_batch, clients), **(extra_env or {})}
    buckets = ",".join(str(b) for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch)
    every = {
        "fast, adaptive batches": {**common, "SEG_ENGINE": "fast", "SEG_SCHEDULER": "batches"},
        "graph, step-level batching": {**common, "SEG_ENGINE": "graph", "SEG_SCHEDULER": "steps",
                                       "SEG_GRAPH_BUCKETS": buckets},
    }
    work = make_workload(max([requests, *clients]), seed=0)
    report = {}
    for name in configs or list(every):
        env, levels = every[name], []
        with GpuMemory() as memory, served(directory, "demo/paligemma2-bench-random", env) as (server, ready):
            log(f"[service {name}] ready in {ready:.1f}s at {server.url}")
            models = httpx_models(server.url)
            if warmup:
                run_level(server.url, work[:min(warmup, len(work))], min(warmup, max(clients)), timeout=600)
            for count in clients:
                level = summarize_level(count, [run_level(server.url, work[:max(requests, count)], count,
                                                          timeout=600)])
                levels.append(level)
                log(f"[service {name} c={count}] {level['requests_per_s']} req/s p50 {level['latency_s']['p50']}s "
                    f"p90 {level['latency_s']['p90']}s first step {level['time_to_first_step_s_mean']}s "
                    f"steps {level['steps_by_path']} errors {level['errors'] or 0}")
        report[name] = {"ready_s": round(ready, 2), "env": env, "levels": levels, "models": models,
                        "gpu_memory_peak_mib": memory.peak_mib}
    return report


def httpx_models(url: str) -> list[dict] | None:
    """The server's /models (graphs captured, batched ≡ solo), or None if it does not answer."""
    import httpx

    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        return httpx.post(url + "/models", json={}, timeout=60).json()["models"]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="3b-448", help="fixture size (scripts/make_tiny_model.py SIZES)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--batches", default="1,8,16,32", help="raw generation batch sizes")
    parser.add_argument("--clients", default="1,16,64", help="service client counts")
    parser.add_argument("--requests", type=int, default=64, help="requests per client count")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per row (raw) and SEG_MAX_NEW_TOKENS")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the service's SEG_MAX_BATCH_SIZE")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".fixtures" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks-out" / "gpu.json")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    from benchmark import machine, versions

    started = time.perf_counter()
    directory = fixtures(args.size, args.cache_dir, args.device, log)
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "versions": versions(),
        "settings": {"size": args.size, "device": args.device, "tokens": args.tokens},
        "raw": raw_generation(directory, args.device, [int(b) for b in args.batches.split(",")], args.tokens, log),
        "service": service(directory, args.device, [int(c) for c in args.clients.split(",")], args.requests,
                           args.tokens, args.max_batch_size, log),
    }
    with contextlib.suppress(Exception):
        import torch

        report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    by_engine = {name: {r["batch"]: r for r in report["raw"]["rows"] if r["engine"] == name and "error" not in r}
                 for name in ("graph", "fast", "hf-generate")}
    for name in ("graph", "fast"):
        ratios = {str(b): round(row["tokens_per_s"] / by_engine["hf-generate"][b]["tokens_per_s"], 2)
                  for b, row in by_engine[name].items() if b in by_engine["hf-generate"]}
        report[f"{name}_over_hf_generate_tokens_per_s"] = ratios
        log(f"{name} / hf-generate tokens/s by batch: {ratios}; median {statistics.median(ratios.values() or [0])}")
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out} in {report['wall_s']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
