#!/usr/bin/env python
"""The real-size CPU benchmark (make bench-cpu): PaliGemma 2 3B's shapes on this machine's cores, float32
against bfloat16, so that a CPU deployment can be sized (docs/benchmarks.md, "Real size on the CPU").

1. **fixture**: `--size` (default `3b-224`: paligemma2-3b-mix-224's shapes and 257 216-token vocabulary,
   random weights) drawn and saved in bfloat16 once into `--cache-dir` (6.8 GB on disk; 105 s and 7.6 GB of
   memory on 2 cores), with DIR/written.json saying how long that first write took; the report gives it
   (`fixture.first_write_s`, `peak_rss_gib`) and this run's seconds for it (`fixture.seconds_now`, 0 once
   cached). float32 runs
   load it and widen the weights (14.4 GB in memory).
2. **raw**, one process per dtype and never two at once (a 3B model in float32 holds 14.4 GB), the dtypes
   interleaved over `--rounds`: load seconds and resident memory, the engine's row isolation and its
   start-up check, the prefill of `--prefill-batches` 224 px images, and the decode step at `--batches`
   rows (rows at real cache positions, grammar on). Where the engine prefills each row alone (bfloat16 on
   the CPU: row isolation) a batch of n costs n single prefills by construction; `--prefill-batches`
   then defaults to 1 there (`prefill_per_row: true` in the report).
3. **profile**, one real-size request in this process through every stage (`--profile-dtype`, default the
   dtype with the faster prefill + `--tokens` steps in the raw phase): decode input (a 1024×768 JPEG to the
   model picture), preprocessing (the processor), prefill, decode steps, parsing and mask decoding (JAX),
   pasting and encoding the answer (RLE); each stage's seconds and share.
4. **service** (`bentoml serve`, `SEG_DEVICE=cpu`, one server at a time, per dtype of `--service-dtypes`)
   at `--clients` concurrent clients: req/s, latency, the engine's stage times, the cores the server used
   (CPU seconds of its process tree per wall second) and its peak resident memory.

    .venv/bin/python scripts/bench_cpu.py --out benchmarks-out/cpu-3b-224.json
    # the slow test suite runs it tiny so that it cannot rot:
    .venv/bin/python scripts/bench_cpu.py --size tiny --tokens 24 --batches 1,2 --clients 1 --requests 1

Random weights write until their budget: `--tokens` is each row's forced token count (raw) and the
server's `SEG_MAX_NEW_TOKENS` (24: one object, its box, 16 mask codes and a label).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts", ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

MODEL_ID = "demo/paligemma2-cpu-bench-random"
# Memory a process needs beside its weights (activations, KV cache, the tokenizer, JAX), GiB.
HEADROOM_GIB = 2.0


def fixture(size: str, cache_dir: Path, log) -> tuple[Path, dict]:
    """DIR/paligemma (bfloat16 weights) and DIR/vae-oid.npz for `size`, written once; (DIR, how the first
    write went: `first_write_s`, `peak_rss_gib` of the writing process, `written` date, from DIR/written.json,
    and `seconds_now`: 0 when cached)."""
    import resource

    from make_tiny_model import write_fixtures

    directory = cache_dir / f"{size}-bf16-seed0"
    record = directory / "written.json"
    if (directory / "vae-oid.npz").is_file() and (directory / "paligemma" / "config.json").is_file():
        first = json.loads(record.read_text()) if record.is_file() else {"first_write_s": None}
        log(f"[fixture] {directory} cached (its first write took {first.get('first_write_s')} s)")
        return directory, {**first, "seconds_now": 0.0}
    log(f"[fixture] writing {size} in bfloat16 into {directory} (once; 3b-224: 105 s and 7.6 GB of memory "
        f"on 2 cores, 6.8 GB on disk)")
    start = time.perf_counter()
    write_fixtures(directory, size=size, dtype="bfloat16", draw_in_dtype=True)
    seconds = time.perf_counter() - start
    # ru_maxrss: KiB on Linux; the process's peak so far (a fresh benchmark process: the write's).
    first = {"first_write_s": round(seconds, 1), "written": time.strftime("%Y-%m-%d"),
             "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    record.write_text(json.dumps(first) + "\n")
    log(f"[fixture] wrote {size} in {seconds:.1f}s (peak {first['peak_rss_gib']} GiB)")
    return directory, {**first, "seconds_now": round(seconds, 1)}


def weights_gib(directory: Path, dtype: str) -> float:
    """The weights' size in memory in `dtype` (the fixture is saved in bfloat16: 2 bytes a parameter)."""
    stored = sum(f.stat().st_size for f in (directory / "paligemma").glob("*.safetensors"))
    return stored / 2**30 * (2 if dtype == "float32" else 1)


def available_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable"))
        return int(line.split()[1]) / 2**20
    return None


def wait_for_memory(need_gib: float, log, patience_s: float = 600) -> None:
    """Wait (up to `patience_s`) until the machine has `need_gib` available: other jobs share it."""
    deadline = time.monotonic() + patience_s
    while (free := available_gib()) is not None and free < need_gib:
        if time.monotonic() > deadline:
            raise SystemExit(f"{need_gib:.1f} GiB of memory needed, {free:.1f} GiB available: stopping")
        log(f"[memory] {free:.1f} GiB available, {need_gib:.1f} GiB needed: waiting")
        time.sleep(15)


# ------------------------------------------------------------------------------------------ raw phase

def raw_worker(directory: Path, dtype: str, batches: list[int], prefill_batches: list[int] | None, tokens: int,
               repeats: int) -> dict:
    """In a process of its own: load, check, prefill and step times for one dtype."""
    import psutil
    import torch
    from engine_timing import sample_batch

    from segmentation.model.cpu import cpu_info
    from segmentation.model.engine import PaliGemmaEngine
    from segmentation.model.graph.decoder import GraphSettings

    load_before = os.getloadavg()  # the machine may be shared: the report keeps its load
    start = time.perf_counter()
    engine = PaliGemmaEngine.from_pretrained(directory / "paligemma", device="cpu", dtype=dtype, generation="graph",
                                             graph=GraphSettings(buckets=tuple(sorted(batches))),
                                             max_new_tokens=tokens)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    decoder = engine.decoder  # buffers, and the row check where rows are isolated
    setup_s = time.perf_counter() - start
    per_row = decoder.per_row_prefill
    prefill_batches = prefill_batches or ([1] if per_row else sorted(set(batches)))
    report = {"dtype": dtype, "torch_threads": torch.get_num_threads(), "cpu": cpu_info(), "load_s": round(load_s, 2),
              "decoder_setup_s": round(setup_s, 2), "row_isolation": engine.row_isolation,
              "row_check": engine.row_check or decoder.row_arithmetic(), "prefill_per_row": per_row,
              "rss_gib_after_load": round(psutil.Process().memory_info().rss / 2**30, 2), "prefill": [], "steps": []}
    images, prompts = sample_batch(max(prefill_batches + batches))
    specs = [engine.row_spec(p, tokens) for p in prompts]
    for batch in prefill_batches:
        inputs = engine.prepare(images[:batch], prompts[:batch])
        decoder.reset()
        start = time.perf_counter()
        if per_row:
            from segmentation.model.graph.decoder import one_row

            for row in range(batch):
                decoder.prefill([row], one_row(inputs, row), [specs[row]], share_images=False)
        else:
            decoder.prefill(list(range(batch)), inputs, specs[:batch])
        seconds = time.perf_counter() - start
        report["prefill"].append({"batch": batch, "seconds": round(seconds, 3),
                                  "seconds_per_image": round(seconds / batch, 3)})
        print(f"[raw {dtype}] prefill b={batch}: {seconds:.2f}s", flush=True)
    # Steps: one prefilled row copied into every slot, so each step's rows sit at real cache positions.
    decoder.reset()
    inputs = engine.prepare(images[:1], prompts[:1])
    decoder.prefill([0], inputs, specs[:1])
    for slot in range(1, decoder.slots):
        decoder.move(0, slot)
    decoder.fit_span(inputs["input_ids"].shape[1] + tokens + 1)
    for batch in batches:
        rows = decoder.batch_for(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            decoder.run_step(rows)
            times.append(time.perf_counter() - start)
        report["steps"].append({"batch": batch, "rows_computed": rows, "ms": round(statistics.median(times) * 1000, 1),
                                "ms_each": [round(t * 1000, 1) for t in times]})
        print(f"[raw {dtype}] step b={batch}: {statistics.median(times) * 1000:.0f} ms "
              f"{[round(t * 1000) for t in times]}", flush=True)
    report["loadavg_before_after"] = [list(load_before), list(os.getloadavg())]
    report["rss_gib_peak"] = round(psutil.Process().memory_info().rss / 2**30, 2)
    with contextlib.suppress(AttributeError, OSError):
        import resource

        report["rss_gib_peak"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return report


def in_subprocess(worker: str, args: list[str], log) -> dict:
    """Run this script's `--worker` in a fresh process (one model in memory at a time); its JSON report."""
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        out = Path(tmp) / "out.json"
        done = subprocess.run([sys.executable, __file__, "--worker", worker, *args, "--worker-out", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in done.stdout.splitlines():
            if line.startswith(("[raw", "[profile")):
                log(line)
        if done.returncode != 0:
            raise RuntimeError(f"the {worker} worker failed ({done.returncode}):\n{done.stdout[-4000:]}")
        return json.loads(out.read_text())


def raw_phase(directory: Path, dtypes: list[str], rounds: int, batches: list[int], prefill_batches: list[int] | None,
              tokens: int, repeats: int, log) -> dict:
    runs: dict[str, list[dict]] = {dtype: [] for dtype in dtypes}
    for index in range(rounds):
        for dtype in dtypes if index % 2 == 0 else list(reversed(dtypes)):
            wait_for_memory(weights_gib(directory, dtype) + HEADROOM_GIB, log)
            args = ["--dir", str(directory), "--dtype", dtype, "--batches", ",".join(map(str, batches)),
                    "--tokens", str(tokens), "--step-repeats", str(repeats)]
            if prefill_batches:
                args += ["--prefill-batches", ",".join(map(str, prefill_batches))]
            runs[dtype].append(in_subprocess("raw", args, log))
    return {dtype: summarize_raw(reports) for dtype, reports in runs.items()}


def summarize_raw(reports: list[dict]) -> dict:
    """Medians over rounds, each round's figures kept."""
    first = reports[0]

    def median_of(key: str, batch: int, field: str):
        values = [row[field] for r in reports for row in r[key] if row["batch"] == batch]
        return round(statistics.median(values), 3) if values else None

    return {
        "torch_threads": first["torch_threads"], "cpu": first["cpu"], "row_isolation": first["row_isolation"],
        "row_check": first["row_check"], "prefill_per_row": first["prefill_per_row"],
        "load_s": [r["load_s"] for r in reports], "loadavg": [r["loadavg_before_after"] for r in reports],
        "rss_gib_peak": max(r["rss_gib_peak"] for r in reports),
        "prefill": [{"batch": row["batch"], "seconds": median_of("prefill", row["batch"], "seconds"),
                     "seconds_per_image": median_of("prefill", row["batch"], "seconds_per_image"),
                     "rounds": [x["seconds"] for r in reports for x in r["prefill"] if x["batch"] == row["batch"]]}
                    for row in first["prefill"]],
        "steps": [{"batch": row["batch"], "rows_computed": row["rows_computed"],
                   "ms": median_of("steps", row["batch"], "ms"),
                   "rounds": [x["ms"] for r in reports for x in r["steps"] if x["batch"] == row["batch"]]}
                  for row in first["steps"]],
    }


def per_token_seconds(raw: dict, tokens: int, batch: int = 1) -> float | None:
    """A request's seconds per generated token at `batch` rows in flight: (prefill of the batch + `tokens`
    steps) / (batch × tokens); the prefill of n rows is n × one where rows are prefilled alone."""
    prefill = {row["batch"]: row["seconds"] for row in raw["prefill"]}
    steps = {row["batch"]: row["ms"] for row in raw["steps"]}
    if batch not in steps:
        return None
    seconds = prefill.get(batch)
    if seconds is None and 1 in prefill and raw["prefill_per_row"]:
        seconds = prefill[1] * batch
    if seconds is None:
        return None
    return round((seconds + tokens * steps[batch] / 1000) / (batch * tokens), 4)


# -------------------------------------------------------------------------------------- profile phase

def profile_worker(directory: Path, dtype: str, tokens: int) -> dict:
    """One real-size request through every stage the service runs, in this process (the engine warmed up)."""
    import random

    from benchmark import make_image
    from engine_timing import PROMPTS

    from segmentation.model.engine import PaliGemmaEngine
    from segmentation.model.graph.decoder import GraphSettings
    from segmentation.model.images import model_input, open_image
    from segmentation.model.prompts import parse_prompt
    from segmentation.model.segmenter import attach_masks, parse_generation
    from segmentation.model.vae import MaskDecoder
    from segmentation.serving.api import answer_body

    engine = PaliGemmaEngine.from_pretrained(directory / "paligemma", device="cpu", dtype=dtype, generation="graph",
                                             graph=GraphSettings(buckets=(1,)), max_new_tokens=tokens)
    masks = MaskDecoder.from_npz(directory / "vae-oid.npz")
    masks.warmup()
    decoder = engine.decoder
    data = make_image(random.Random(0), 1024, 768)
    prompt = parse_prompt(PROMPTS[1])  # "cat ; dog"
    spec = engine.row_spec(prompt, tokens)
    stages: dict[str, float] = {}

    def timed(name: str, function, *args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - start
        return result

    original = timed("decode_input", open_image, data)
    width, height = original.size
    picture = timed("decode_input", model_input, original, engine.image_size)
    inputs = timed("preprocess", engine.prepare, [picture], [prompt])
    [decoded] = timed("prefill_and_steps", decoder.decode, inputs, [spec], share_images=False)
    timing = decoder.last_timing
    stages["prefill"] = timing["prefill_s"]
    stages["steps"] = stages.pop("prefill_and_steps") - timing["prefill_s"]
    generation = timed("parse_and_masks", engine._row, decoded.token_ids, decoded.token_logprobs)
    parsed = timed("parse_and_masks", parse_generation, engine, prompt, generation)
    [prediction] = timed("parse_and_masks", attach_masks, masks, [parsed])
    body = timed("paste_and_encode", answer_body, prediction, width, height, model=MODEL_ID, mask_format="rle")
    timed("paste_and_encode", json.dumps, body)
    total = sum(stages.values())
    load = os.getloadavg()
    outside = total - stages["prefill"] - stages["steps"]
    return {
        "dtype": dtype, "image": [width, height], "prompt": prompt.text, "tokens": len(generation.token_ids),
        "steps": timing["steps"], "step_ms": round(timing["step_ms"], 1), "objects": len(prediction.objects),
        "masks": sum(o.mask64 is not None for o in prediction.objects),
        "stages_s": {name: round(seconds, 4) for name, seconds in stages.items()},
        "shares": {name: round(seconds / total, 4) for name, seconds in stages.items()},
        "outside_model_share": round(outside / total, 4), "total_s": round(total, 3), "loadavg_after": list(load),
    }


# -------------------------------------------------------------------------------------- service phase

class TreeUsage:
    """CPU seconds and peak resident memory of a process and its descendants (the server's workers)."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.peak_gib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _processes(self):
        import psutil

        with contextlib.suppress(psutil.Error):
            return [self.root, *self.root.children(recursive=True)]
        return []

    def cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        for process in self._processes():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            rss = 0
            for process in self._processes():
                with contextlib.suppress(psutil.Error):
                    rss += process.memory_info().rss
            self.peak_gib = max(self.peak_gib, rss / 2**30)
            self._stop.wait(1.0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def service_phase(directory: Path, dtypes: list[str], clients: list[int], requests: int, tokens: int,
                  max_batch: int, log) -> dict:
    """Each dtype's server in turn (one 3B process at a time): every client level, cores used, memory."""
    from benchmark import make_workload, run_level, served, summarize_level

    work = make_workload(max([requests, *clients]), seed=0)
    report = {}
    for dtype in dtypes:
        wait_for_memory(weights_gib(directory, dtype) + HEADROOM_GIB, log)
        env = {"SEG_DEVICE": "cpu", "SEG_DTYPE": dtype, "SEG_MAX_NEW_TOKENS": str(tokens),
               "SEG_MAX_BATCH_SIZE": str(max_batch), "SEG_MAX_LATENCY_MS": "3600000", "SEG_REQUEST_TIMEOUT_S": "3600",
               "SEG_MAX_CONCURRENCY": str(max(clients) * 4), "JAX_PLATFORMS": "cpu"}
        levels = []
        with served(directory, MODEL_ID, env) as (server, ready):
            usage = TreeUsage(server.process.pid)
            log(f"[service {dtype}] ready in {ready:.1f}s at {server.url}")
            models = models_of(server.url)
            try:
                for count in clients:
                    cpu, wall = usage.cpu_seconds(), time.perf_counter()
                    level = summarize_level(count, [run_level(server.url, work[:max(requests, count)], count,
                                                              timeout=3600)])
                    level["cores_used"] = round((usage.cpu_seconds() - cpu) / (time.perf_counter() - wall), 2)
                    levels.append(level)
                    log(f"[service {dtype} c={count}] {level['requests_per_s']} req/s p50 {level['latency_s']['p50']}s "
                        f"cores {level['cores_used']} stages {level.get('stage_seconds_mean')} "
                        f"errors {level['errors'] or 0}")
            finally:
                usage.close()
        report[dtype] = {"ready_s": round(ready, 1), "env": env, "models": models, "levels": levels,
                         "peak_rss_gib": round(usage.peak_gib, 2)}
    return report


def models_of(url: str) -> list[dict] | None:
    import httpx

    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        return httpx.post(url + "/models", json={}, timeout=60).json()["models"]
    return None


# ------------------------------------------------------------------------------------------------ main

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="3b-224", help="fixture size (scripts/make_tiny_model.py SIZES)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="dtypes of the raw phase")
    parser.add_argument("--rounds", type=int, default=2, help="raw phase: each dtype this many times, interleaved")
    parser.add_argument("--batches", default="1,2,4", help="decode-step batch sizes")
    parser.add_argument("--prefill-batches", default="", help="prefill batch sizes (default: the step batches; "
                                                                "1 where rows are prefilled alone)")
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=24, help="tokens per row (raw, profile) and SEG_MAX_NEW_TOKENS")
    parser.add_argument("--profile-dtype", default="", help="the profile's dtype (default: the faster one)")
    parser.add_argument("--service-dtypes", default="float32,bfloat16", help="'' skips the service phase")
    parser.add_argument("--clients", default="1,4", help="service client counts")
    parser.add_argument("--requests", type=int, default=4, help="requests per client level (at least the clients)")
    parser.add_argument("--max-batch-size", type=int, default=4, help="the service's SEG_MAX_BATCH_SIZE")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".fixtures" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks-out" / "cpu.json")
    parser.add_argument("--worker", choices=("raw", "profile"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        if args.worker == "raw":
            result = raw_worker(args.dir, args.dtype, _ints(args.batches), _ints(args.prefill_batches) or None,
                                args.tokens, args.step_repeats)
        else:
            result = profile_worker(args.dir, args.dtype, args.tokens)
        args.worker_out.write_text(json.dumps(result))
        return 0

    def log(line: str) -> None:
        print(line, flush=True)

    from benchmark import machine, versions

    started = time.perf_counter()
    directory, written = fixture(args.size, args.cache_dir, log)
    dtypes = [d for d in args.dtypes.split(",") if d]
    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "versions": versions(),
              "settings": {"size": args.size, "tokens": args.tokens, "batches": _ints(args.batches),
                           "clients": _ints(args.clients), "requests": args.requests,
                           "max_batch_size": args.max_batch_size, "rounds": args.rounds},
              "fixture": {"directory": str(directory), **written, "gib": round(weights_gib(directory, "bfloat16"), 2)}}
    report["raw"] = raw_phase(directory, dtypes, args.rounds, _ints(args.batches), _ints(args.prefill_batches) or None,
                              args.tokens, args.step_repeats, log)
    per_token = {dtype: {str(b): per_token_seconds(raw, args.tokens, b) for b in _ints(args.batches)}
                 for dtype, raw in report["raw"].items()}
    report["seconds_per_token"] = per_token
    log(f"[raw] seconds per generated token by rows in flight (prefill + {args.tokens} steps): {per_token}")
    profile_dtype = args.profile_dtype or min(per_token, key=lambda d: per_token[d].get("1") or float("inf"))
    wait_for_memory(weights_gib(directory, profile_dtype) + HEADROOM_GIB, log)
    report["profile"] = in_subprocess("profile", ["--dir", str(directory), "--dtype", profile_dtype,
                                                  "--tokens", str(args.tokens)], log)
    log(f"[profile {profile_dtype}] {report['profile']['stages_s']}; outside the model "
        f"{report['profile']['outside_model_share'] * 100:.2f} %")
    service_dtypes = [d for d in args.service_dtypes.split(",") if d]
    if service_dtypes:
        report["service"] = service_phase(directory, service_dtypes, _ints(args.clients), args.requests, args.tokens,
                                          args.max_batch_size, log)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out} in {report['wall_s']}s (fixture {report['fixture']['seconds_now']}s of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
