#!/usr/bin/env python
"""One command that proves (or disproves) the engine on a CUDA GPU in a few minutes: `make gpu-check`.

For an offline GPU host (torch, transformers, JAX, numpy, Pillow installed; the rest from the kit that
`../shared/gpu/prepare.sh` puts in `.gpu/`):

    bash .gpu/run.sh python3 scripts/gpu_check.py --out "$OUT/gpu-check.json" --cache-dir /tmp/fx
    bash .gpu/run.sh python3 scripts/gpu_check.py --quick ...            # about 4 minutes
    ... --skip service,invariance   |   --only tiny,kernels              # any phase can be left out

Without a CUDA GPU it refuses at once (exit status 2), naming CUDA. Each phase runs in a process of its
own (a phase that hangs or breaks the CUDA context costs only itself) under a time budget, within a
total `--budget`; the JSON report (`--out`) is rewritten after every phase, so a killed run still
reports, and the whole output also goes to `--out` with `.log`. One line per phase:

    PASS|FAIL|INFO|SKIP  phase  seconds/budget  reason

PASS: what the phase checks holds; FAIL: it does not (the reason says what, the JSON holds the figures);
INFO: figures only, never a failure; SKIP: not run (--skip, --only, or no time left). The exit status
is 1 when a phase failed, else 0.

Phases, in order (seconds measured or estimated on one H200 with the 3b-448 fixture, default run; a
phase's budget is the most it may take):

  tiny        ~20 s  (budget 90)   the tiny model in float32 on the card: a CUDA graph captured for every
                                   bucket (1, 2, 4, 8); for 1, 2, 3, 5 and 8 rows with mixed budgets and
                                   tasks, the replayed graphs give the tokens and log-probabilities of the
                                   same fixed-shape step run eagerly, bit for bit; 12 requests through the
                                   StepScheduler (8 slots: rows leave and others join) answer identically
                                   with graphs and with eager steps; steps are counted on the right path
                                   (graph / fixed). Agreement with the `fast` loop and with solo runs: rates.
  kernels     ~6 s   (budget 45)   the batch-invariant kernels (SEG_BATCH_INVARIANT): available, registered
                                   at the CUDA dispatch key (an aten::mm on a CUDA tensor reaches them, one
                                   on a CPU tensor does not, none after disable); linear and softmax rows
                                   equal batched and alone in bfloat16 and float32 with the mode on;
                                   milliseconds off and on.
  capture     ~25 s  (budget 150)  the 3b-448 fixture (written once into --cache-dir: ~12 s), loaded in
                                   bfloat16; the graph engine's buffers and one CUDA graph per bucket
                                   (1, 2, 4, 8, 16, 32): seconds and graph-pool MiB per bucket, the buffers'
                                   MiB, GPU memory reserved. FAIL if any bucket failed to capture.
  speed       ~35 s  (budget 150)  decode step ms at batch 1/8/16/32 for graph, fast and hf-generate, and the
                                   bare captured forward of the same step (the floor); tokens/s; prefill
                                   ms per image; graph step over the floor.
  agreement   ~0 s   (budget 60)   bfloat16: rows of graph equal to hf-generate and to fast (same inputs,
                                   forced budgets), from the speed phase's outputs: rates, never a failure.
  prefill     ~60 s  (budget 150)  (estimate, never run on a GPU yet) the prefill's kernels on the same model
                                   (SEG_PREFILL_ATTENTION): ms per image at each batch size for `eager` and
                                   `flex` (compiled flex_attention), each bucket's first call (the compile)
                                   apart, first-token agreement between them; which kernel `auto` picks. FAIL
                                   if `auto` does not pick flex on CUDA (flex_attention did not compile).
  lora        ~60 s  (budget 180)  (estimate) 3 random rank-16 adapters on every projection, stacked in the
                                   decode step: capture seconds with them, then decode step ms at the largest
                                   batch for base rows on an engine without adapters, base rows and half
                                   adapter rows on the engine with them; steps by path. FAIL if a mixed
                                   batch's step did not replay a graph (`peft` or `fixed` on CUDA).
  invariance  ~70 s  (budget 200)  the graph engine in bfloat16, SEG_BATCH_INVARIANT off then on, graphs
                                   captured anew for each mode: 16 rows batched vs each alone (rows equal,
                                   bit-equal), step ms at bucket 16 and 1 and the on/off cost ratio. FAIL if
                                   a row differs with the mode on (it promises bit for bit).
  service     ~70 s  (budget 240)  `bentoml serve` on the fixture (graph engine, step-level batching,
                                   SEG_REQUIRE_GRAPHS=true) at 1/16/64 clients: req/s, p50/p90, mean time
                                   to first step, decode steps by path, GPU memory, /models. FAIL on any
                                   error answer or any decode step that did not replay a graph.
  pytest      ~45 s  (budget 150)  `pytest -m cuda tests/model/test_cuda.py` (capture and replay against the
                                   eager step, the host-sync guard on CUDA, buffers reserved once, the
                                   invariant kernels at the CUDA key).

Default run: ~6.5 minutes of phases (the prefill and lora phases' two minutes estimated, not yet measured)
plus ~20 s for .gpu/run.sh; `--quick` (32 tokens, batches 1/8/32, 8 invariance rows of 24 tokens, fewer
service requests): ~5.5 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts", ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# name: (budget s, quick budget s, expected s on one H200): see the module docstring.
PHASES: dict[str, tuple[int, int, int]] = {
    "env": (30, 30, 2),
    "tiny": (90, 75, 20),
    "kernels": (45, 45, 6),
    "capture": (150, 120, 25),
    "speed": (150, 90, 35),
    "agreement": (60, 60, 1),
    "prefill": (150, 120, 60),
    "lora": (180, 150, 60),
    "invariance": (200, 120, 70),
    "service": (240, 180, 70),
    "pytest": (150, 150, 45),
}
# Phases that share a process (and what they loaded): the 3b model for capture, speed and agreement.
# `lora` comes last in its group: attaching adapters wraps the shared model's layers in place.
GROUPS = (("tiny", "kernels"), ("capture", "speed", "agreement", "prefill", "lora"), ("invariance",), ("service",),
          ("pytest",))
MARK = "@@gpu-check"
STATUSES = ("PASS", "FAIL", "INFO", "SKIP")

DEFAULTS = {"tiny_rows": [1, 2, 3, 5, 8], "tiny_tokens": 64, "tokens": 64, "batches": [1, 8, 16, 32],
            "buckets": [1, 2, 4, 8, 16, 32], "invariance_rows": 16, "invariance_tokens": 48, "clients": [1, 16, 64],
            "requests": 16, "budget": 480, "adapters": 3, "lora_rank": 16}
QUICK = {**DEFAULTS, "tokens": 32, "batches": [1, 8, 32], "invariance_rows": 8, "invariance_tokens": 24,
         "requests": 8, "budget": 300}


def result(status: str, reason: str, **data) -> dict:
    assert status in STATUSES, status
    return {"status": status, "reason": reason, **data}


# ------------------------------------------------------------------------------------ the phases

def _tiny_engines(device: str):
    from make_tiny_model import SIZES, build_paligemma, build_processor, build_tokenizer
    from segmentation.model.engine import PaliGemmaEngine
    from segmentation.model.graph.decoder import GraphSettings

    tokenizer = build_tokenizer()
    model = build_paligemma(tokenizer, size="tiny", seed=0, device=device).float().eval()
    processor = build_processor(tokenizer, SIZES["tiny"]["image_size"])
    graph = PaliGemmaEngine(model, processor, generation="graph", max_new_tokens=96,
                            graph=GraphSettings(buckets=(1, 2, 4, 8), sync_every=2))
    return graph, PaliGemmaEngine(model, processor, generation="fast", max_new_tokens=96)


def _requests(count: int, seed: int, cap: int = 64):
    from pictures import random_image

    from segmentation.model.prompts import parse_prompt

    texts = ("cat ; dog", "car ; bus ; truck", "bird", "person ; the man on the left", "tree")
    images = [random_image(60 + 7 * i, 90 - 5 * i, seed + i) for i in range(count)]
    prompts = [parse_prompt(texts[i % len(texts)], "detect" if i % 3 == 2 else "segment") for i in range(count)]
    budgets = [min(cap, 6 + (17 * i + 5 * seed) % 60) for i in range(count)]
    return images, prompts, budgets


def _same(a, b) -> bool:
    return a.token_ids == b.token_ids and a.token_logprobs == b.token_logprobs


def _steps_since(before: dict, after: dict) -> dict:
    return {path: after[path] - before[path] for path in after if after[path] != before[path]}


def _scheduled(engine, images, prompts, budgets) -> tuple[list, dict]:
    """Every request queued before the scheduler's loop admits any (it waits on the lock held here), so
    the schedule of joins and leaves is the same in every run with the same answers."""
    from segmentation.model.graph.scheduler import StepScheduler

    scheduler = StepScheduler(engine)
    try:
        with scheduler._wake:
            futures = [scheduler.submit(i, p, max_new_tokens=b) for i, p, b in zip(images, prompts, budgets)]
        answers = [future.result(timeout=300) for future in futures]
        stats = vars(scheduler.stats).copy()
    finally:
        scheduler.close()
    return answers, stats


def replay_and_eager(engine, images, prompts, budgets) -> tuple[list, list, dict, dict]:
    """One batch through the graph engine twice: its graphs replayed, then the same fixed-shape step run
    eagerly (`without_graphs`): (replayed, eager, steps of the first by path, steps of the second)."""
    decoder = engine.decoder
    before = dict(decoder.steps)
    replayed = engine.generate(images, prompts, max_new_tokens=budgets)
    middle = dict(decoder.steps)
    with decoder.without_graphs():
        eager = engine.generate(images, prompts, max_new_tokens=budgets)
    return replayed, eager, _steps_since(before, middle), _steps_since(middle, dict(decoder.steps))


def phase_tiny(ctx) -> dict:
    device = ctx["device"]
    graph, fast = _tiny_engines(device)
    decoder = graph.decoder
    on_cuda = device.startswith("cuda")
    data = {"buckets": list(decoder.buckets), "captured": sorted(decoder.graphs),
            "capture_failures": {str(b): r for b, r in decoder.capture_failures.items()},
            "capture_s": round(decoder.capture_seconds, 3), "cases": []}
    problems = []
    if on_cuda and sorted(decoder.graphs) != list(decoder.buckets):
        problems.append(f"graphs captured for {sorted(decoder.graphs)} of {list(decoder.buckets)}: "
                        f"{data['capture_failures']}")
    replay_path = "graph" if on_cuda else "fixed"
    cap = ctx["tiny_tokens"]
    for rows in ctx["tiny_rows"]:
        images, prompts, budgets = _requests(rows, seed=rows, cap=cap)
        replayed, eager, steps_replayed, steps_eager = replay_and_eager(graph, images, prompts, budgets)
        quick = fast.generate(images, prompts, max_new_tokens=budgets)
        solo = [graph.generate([i], [p], max_new_tokens=[b])[0] for i, p, b in zip(images, prompts, budgets)]
        case = {
            "rows": rows, "bucket": decoder.batch_for(rows), "budgets": budgets,
            "replay_eq_eager": sum(_same(a, b) for a, b in zip(replayed, eager)),
            "replay_eq_eager_tokens": sum(a.token_ids == b.token_ids for a, b in zip(replayed, eager)),
            "max_abs_dlogprob_eager": max((abs(x - y) for a, b in zip(replayed, eager)
                                           for x, y in zip(a.token_logprobs, b.token_logprobs)), default=0.0),
            "replay_eq_fast_tokens": sum(a.token_ids == b.token_ids for a, b in zip(replayed, quick)),
            "replay_eq_solo_tokens": sum(a.token_ids == b.token_ids for a, b in zip(replayed, solo)),
            "tokens": [len(a.token_ids) for a in replayed],
            "steps_replayed": steps_replayed, "steps_eager": steps_eager,
        }
        data["cases"].append(case)
        if case["replay_eq_eager"] != rows:
            problems.append(f"{rows} rows: replay == eager for {case['replay_eq_eager']} only (tokens "
                            f"{case['replay_eq_eager_tokens']}, max |dlogprob| {case['max_abs_dlogprob_eager']})")
        if set(case["steps_replayed"]) - {replay_path} or set(case["steps_eager"]) - {"fixed"}:
            problems.append(f"{rows} rows: steps on unexpected paths {case['steps_replayed']} / {case['steps_eager']}")
    # Rows leaving and joining: 12 requests for 8 slots through the step-level scheduler.
    images, prompts, budgets = _requests(12, seed=40, cap=cap)
    before = dict(decoder.steps)
    replayed, stats = _scheduled(graph, images, prompts, budgets)
    middle = dict(decoder.steps)
    with decoder.without_graphs():
        eager, _ = _scheduled(graph, images, prompts, budgets)
    after = dict(decoder.steps)
    solo = [graph.generate([i], [p], max_new_tokens=[b])[0] for i, p, b in zip(images, prompts, budgets)]
    scheduler = {"requests": 12, "slots": decoder.slots, "stats": stats,
                 "replay_eq_eager": sum(_same(a, b) for a, b in zip(replayed, eager)),
                 "replay_eq_solo_tokens": sum(a.token_ids == b.token_ids for a, b in zip(replayed, solo)),
                 "steps_replayed": _steps_since(before, middle), "steps_eager": _steps_since(middle, after)}
    data["scheduler"] = scheduler
    if scheduler["replay_eq_eager"] != 12:
        problems.append(f"scheduler: replay == eager for {scheduler['replay_eq_eager']}/12 requests")
    if stats["admitted"] <= decoder.slots:
        problems.append(f"scheduler: only {stats['admitted']} admissions: no row joined a running batch")
    if set(scheduler["steps_replayed"]) - {replay_path}:
        problems.append(f"scheduler steps on unexpected paths: {scheduler['steps_replayed']}")
    data["engine_steps"] = dict(graph.steps)
    rows = sum(c["rows"] for c in data["cases"])
    rates = (f"fast {sum(c['replay_eq_fast_tokens'] for c in data['cases'])}/{rows}, solo "
             f"{sum(c['replay_eq_solo_tokens'] for c in data['cases'])}/{rows} + "
             f"{scheduler['replay_eq_solo_tokens']}/12 scheduled")
    if problems:
        return result("FAIL", "; ".join(problems), **data)
    where = (f"graphs for buckets {data['captured']} in {data['capture_s']:.2f}s; replay" if on_cuda
             else f"no graphs on {device}; the step")
    return result("PASS", f"{where} == eager fixed-shape step bit for bit in float32 ({rows} rows in "
                          f"{len(data['cases'])} batches, "
                          f"12 scheduled requests, {stats['admitted']} admissions for {decoder.slots} slots); "
                          f"tokens equal to {rates}", **data)


def phase_kernels(ctx) -> dict:
    import torch
    import torch.nn.functional as F

    from segmentation.model import invariant

    kind = torch.device(ctx["device"]).type
    if not invariant.available(kind):
        why = "Triton missing, TRITON_INTERPRET=1, or a GPU older than sm80" if kind == "cuda" else \
            "the CPU runs them only under Triton's interpreter"
        return result("FAIL" if kind == "cuda" else "INFO", f"batch-invariant kernels unavailable on {kind} ({why})",
                      available=False)
    from segmentation.model.invariant import kernels

    calls = {"n": 0}
    original = kernels.matmul

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    a = torch.randn(8, 64, device=kind)
    kernels.matmul = counted
    try:
        with invariant.batch_invariant(kind):
            torch.mm(a, a.T)
            on_device = calls["n"]
            if kind != "cpu":
                torch.mm(a.cpu(), a.cpu().T)
            other_device = calls["n"] - on_device
        torch.mm(a, a.T)
        after_disable = calls["n"] - on_device - other_device
    finally:
        kernels.matmul = original
    registered = on_device > 0 and other_device == 0 and after_disable == 0
    data = {"available": True, "registered": {"calls_on_device": on_device, "calls_on_cpu_tensor": other_device,
                                              "calls_after_disable": after_disable}, "rows": {}}
    generator = torch.Generator(device=kind).manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.randn(2304, 2304, device=kind, generator=generator, dtype=dtype)
        x = torch.randn(16, 2304, device=kind, generator=generator, dtype=dtype)
        for mode in ("off", "on"):
            scope = invariant.batch_invariant(kind) if mode == "on" else contextlib.nullcontext()
            with scope:
                batched = F.linear(x, w)
                alone = torch.cat([F.linear(x[i:i + 1], w) for i in range(16)])
                soft = torch.softmax(x.float(), -1)
                soft_alone = torch.cat([torch.softmax(x[i:i + 1].float(), -1) for i in range(16)])
                _sync(kind)
                start = time.perf_counter()
                for _ in range(20):
                    F.linear(x, w)
                _sync(kind)
                data["rows"][f"{str(dtype).removeprefix('torch.')} {mode}"] = {
                    "linear_rows_equal": int((batched == alone).all(-1).sum()),
                    "softmax_rows_equal": int((soft == soft_alone).all(-1).sum()), "rows": 16,
                    "linear_ms": round((time.perf_counter() - start) * 1000 / 20, 4)}
    unequal = {k: v for k, v in data["rows"].items() if k.endswith(" on")
               and (v["linear_rows_equal"] != 16 or v["softmax_rows_equal"] != 16)}
    if not registered or unequal:
        return result("FAIL", ("not registered at the CUDA key: " + json.dumps(data["registered"]) if not registered
                               else f"rows differ with the mode on: {unequal}"), **data)
    ms = data["rows"]
    return result("PASS", f"registered at the {kind.upper()} key; rows batched == alone with the mode on (bf16, fp32); "
                          f"linear 16x2304 bf16 {ms['bfloat16 off']['linear_ms']} ms off, "
                          f"{ms['bfloat16 on']['linear_ms']} ms on", **data)


def _sync(kind: str) -> None:
    import torch

    if kind == "cuda":
        torch.cuda.synchronize()


def _fixture(ctx) -> Path:
    from bench_gpu import fixtures

    start = time.perf_counter()
    directory = fixtures(ctx["size"], Path(ctx["cache_dir"]), ctx["device"], ctx["log"])
    ctx["state"].setdefault("fixture_s", round(time.perf_counter() - start, 1))
    return directory


def phase_capture(ctx) -> dict:
    import torch
    from bench_gpu import ENGINE_SETUP, load_engines

    directory = _fixture(ctx)
    on_cuda = ctx["device"].startswith("cuda")
    engines = load_engines(directory, ctx["device"], ctx["batches"], ctx["tokens"], ctx["log"],
                           buckets=tuple(ctx["buckets"]))
    ctx["state"]["engines"] = engines
    setup = dict(ENGINE_SETUP["graph"])
    data = {"fixture": str(directory), "fixture_s": ctx["state"]["fixture_s"], "load_s": ENGINE_SETUP["load_s"],
            **setup, "gpu_reserved_mib": round(torch.cuda.memory_reserved() / 2**20, 1) if on_cuda else None}
    if not on_cuda:
        return result("INFO", f"no CUDA graphs on {ctx['device']}: buffers {setup['reserved_mib']} MiB", **data)
    if setup["failures"] or setup["captured"] != sorted(ctx["buckets"]):
        return result("FAIL", f"captured {setup['captured']} of {sorted(ctx['buckets'])}: {setup['failures']}", **data)
    per = ", ".join(f"{b}: {r['seconds']:.2f}s/{r['pool_mib']:.0f}MiB" for b, r in setup["per_bucket"].items())
    return result("PASS", f"{setup['graphs']} graphs in {setup['capture_s']}s ({per}); buffers "
                          f"{setup['reserved_mib']:.0f} MiB; {data['gpu_reserved_mib']:.0f} MiB reserved", **data)


def phase_speed(ctx) -> dict:
    from bench_gpu import floor_step, load_engines, measure_engines

    engines = ctx["state"].get("engines")
    if engines is None:
        engines = ctx["state"]["engines"] = load_engines(_fixture(ctx), ctx["device"], ctx["batches"], ctx["tokens"],
                                                         ctx["log"], buckets=tuple(ctx["buckets"]))
    rows, generations = measure_engines(engines, ctx["batches"], ctx["tokens"], ctx["log"])
    ctx["state"]["generations"] = generations
    floor = {f["batch"]: f["step_ms"] for f in (floor_step(engines["graph"].decoder, b, ctx["log"])
                                                for b in ctx["batches"])}
    table = {}
    for row in rows:
        if "error" in row:
            continue
        entry = table.setdefault(str(row["batch"]), {"floor_step_ms": floor.get(row["batch"])})
        entry[row["engine"]] = {k: row[k] for k in ("step_ms", "tokens_per_s", "prefill_ms_per_image")}
    for entry in table.values():
        graph_step = (entry.get("graph") or {}).get("step_ms")
        if graph_step and entry["floor_step_ms"]:
            entry["graph_over_floor"] = round(graph_step / entry["floor_step_ms"], 2)
    data = {"tokens_per_row": ctx["tokens"], "rows": rows, "floor": floor, "by_batch": table}
    errors = [f"{r['engine']} b={r['batch']}: {r['error']}" for r in rows if "error" in r]
    if errors:
        return result("FAIL", "; ".join(errors), **data)
    summary = "; ".join(
        f"b={b} graph {e['graph']['step_ms']}ms (floor {e['floor_step_ms']}) fast {e['fast']['step_ms']}ms "
        f"hf {e['hf-generate']['step_ms']}ms" for b, e in table.items() if {"graph", "fast", "hf-generate"} <= set(e))
    return result("PASS", f"decode step: {summary}", **data)


def phase_agreement(ctx) -> dict:
    generations = ctx["state"].get("generations")
    if generations is None:  # the speed phase did not run here: a small run of its own
        from bench_gpu import load_engines, measure_engines

        engines = ctx["state"].get("engines") or load_engines(_fixture(ctx), ctx["device"], [8], 32, ctx["log"],
                                                              buckets=(8,))
        _, generations = measure_engines(engines, [8], 32, ctx["log"])
    from bench_invariance import first_difference

    by_batch, totals = {}, {"graph=hf-generate": [0, 0], "graph=fast": [0, 0], "fast=hf-generate": [0, 0]}
    for batch in sorted({b for _, b in generations}):
        entry = {}
        for pair in totals:
            a, b = pair.split("=")
            if (a, batch) not in generations or (b, batch) not in generations:
                continue
            first, second = generations[(a, batch)], generations[(b, batch)]
            equal = sum(x.token_ids == y.token_ids for x, y in zip(first, second))
            entry[pair] = {"rows_equal": equal, "rows": len(first),
                           "first_divergence": [first_difference(x.token_ids, y.token_ids)
                                                for x, y in zip(first, second)]}
            totals[pair][0] += equal
            totals[pair][1] += len(first)
        by_batch[str(batch)] = entry
    rates = {pair: f"{equal}/{rows}" for pair, (equal, rows) in totals.items() if rows}
    return result("INFO", "rows with equal tokens (reported, never a failure): "
                          + ", ".join(f"{p} {r}" for p, r in rates.items()), rates=rates, by_batch=by_batch)


def phase_invariance(ctx) -> dict:
    import torch
    from bench_invariance import MIXED_PROMPTS, _prompt, invariance, pictures

    from segmentation.model import invariant
    from segmentation.model.engine import PaliGemmaEngine
    from segmentation.model.graph.decoder import GraphSettings

    device, kind = ctx["device"], torch.device(ctx["device"]).type
    rows, tokens = ctx["invariance_rows"], ctx["invariance_tokens"]
    directory = _fixture(ctx)
    settings = GraphSettings(buckets=tuple(sorted({1, rows})))
    base = PaliGemmaEngine.from_pretrained(directory / "paligemma", device=device, dtype="bfloat16",
                                           generation="graph", max_new_tokens=tokens, graph=settings)
    modes = ["off", "on"] if invariant.available(kind) else ["off"]
    data = {"rows": rows, "tokens": tokens, "dtype": "bfloat16", "modes": {}}
    prompts = [_prompt(MIXED_PROMPTS[i % len(MIXED_PROMPTS)], "segment") for i in range(rows)]
    images = pictures(rows, base.image_size)
    for mode in modes:
        on = mode == "on"
        # A new engine per mode: its decoder captures its graphs under this mode (the engine would also
        # capture them again by itself on a mode change: engine.decoder).
        engine = base if not on else PaliGemmaEngine(base.model, base.processor, generation="graph",
                                                     max_new_tokens=tokens, graph=settings, batch_invariant=True)
        try:
            if on and kind != "cuda":
                invariant.enable(kind)
            start = time.perf_counter()
            decoder = engine.decoder
            engine.generate(pictures(1, engine.image_size, 99), [_prompt("cat", "segment")], max_new_tokens=[2])
            setup_s = time.perf_counter() - start
            measured = invariance(engine, prompts, images, tokens)
            solo_timing = dict(decoder.last_timing)  # the last solo row's
            engine.generate(images, prompts, max_new_tokens=[tokens] * rows)
            batched_timing = dict(decoder.last_timing)
            data["modes"][mode] = {
                **measured, "setup_s": round(setup_s, 2), "graph_mode": sorted(decoder.graph_mode),
                "captured": sorted(decoder.graphs), "describe": engine.invariance(),
                "step_ms_batched": round(batched_timing["step_ms"], 3), "bucket_batched": batched_timing["bucket"],
                "step_ms_solo": round(solo_timing["step_ms"], 3), "engine_steps": dict(engine.steps)}
            ctx["log"](f"[invariance {mode}] rows equal {measured['rows_equal']}/{rows} "
                       f"(bit-equal {measured['rows_bit_equal']}), step {data['modes'][mode]['step_ms_batched']} ms "
                       f"at {rows}, {data['modes'][mode]['step_ms_solo']} ms alone")
        finally:
            if on:
                invariant.disable(kind)
    off, on = data["modes"]["off"], data["modes"].get("on")
    if on is None:
        status = "FAIL" if kind == "cuda" else "INFO"
        return result(status, f"mode off: {off['rows_equal']}/{rows} rows equal alone; the mode is unavailable on "
                              f"{kind}", **data)
    data["step_cost_ratio"] = {"batched": round(on["step_ms_batched"] / off["step_ms_batched"], 3),
                               "solo": round(on["step_ms_solo"] / off["step_ms_solo"], 3)}
    line = (f"off: {off['rows_equal']}/{rows} rows equal alone (bit-equal {off['rows_bit_equal']}); on: "
            f"{on['rows_equal']}/{rows} (bit-equal {on['rows_bit_equal']}); step cost on/off "
            f"x{data['step_cost_ratio']['batched']} at {rows} rows, x{data['step_cost_ratio']['solo']} alone; "
            f"graphs captured anew per mode ({off['graph_mode'] or 'off'} / {on['graph_mode']})")
    if on["rows_bit_equal"] != rows or on["graph_mode"] != [kind]:
        return result("FAIL", "the mode promises bit for bit: " + line, **data)
    return result("PASS", line, **data)


def phase_service(ctx) -> dict:
    from bench_gpu import service

    directory = _fixture(ctx)
    on_cuda = ctx["device"].startswith("cuda")
    name = "graph, step-level batching"
    # On the GPU a capture failure stops the start at once, with its reason, rather than measure eager steps.
    extra = {"SEG_REQUIRE_GRAPHS": "true"} if on_cuda else {}
    report = service(directory, ctx["device"], ctx["clients"], ctx["requests"], ctx["tokens"], max(ctx["buckets"]),
                     ctx["log"], configs=[name], warmup=8, extra_env=extra)[name]
    problems = []
    for level in report["levels"]:
        if level["errors"]:
            problems.append(f"{level['concurrency']} clients: errors {level['errors']}")
        stray = {p: n for p, n in level["steps_by_path"].items() if p != ("graph" if on_cuda else "fixed")}
        if stray:
            problems.append(f"{level['concurrency']} clients: steps off the graphs {stray}")
    graphs = [(m.get("graphs") or {}) for m in report.get("models") or []]
    if on_cuda and not all(g.get("captured") for g in graphs):
        problems.append(f"/models: graphs not captured {graphs}")
    summary = "; ".join(f"c={lv['concurrency']} {lv['requests_per_s']} req/s p50 {lv['latency_s']['p50']}s "
                        f"p90 {lv['latency_s']['p90']}s first step {lv['time_to_first_step_s_mean']}s"
                        for lv in report["levels"])
    line = f"ready in {report['ready_s']}s; {summary}; GPU memory peak {report['gpu_memory_peak_mib']} MiB"
    return result("FAIL" if problems else "PASS", ("; ".join(problems) + " | " if problems else "") + line, **report)


def _shared_model(ctx):
    """The 3b fixture's engine loaded once per worker (the speed phase's, when it ran here)."""
    engines = ctx["state"].get("engines")
    if engines is not None:
        return engines["fast"]
    if "base" not in ctx["state"]:
        from segmentation.model.engine import PaliGemmaEngine

        ctx["state"]["base"] = PaliGemmaEngine.from_pretrained(_fixture(ctx) / "paligemma", device=ctx["device"])
    return ctx["state"]["base"]


def phase_prefill(ctx) -> dict:
    import torch
    from bench_prefill import time_prefill

    from segmentation.model.engine import PaliGemmaEngine
    from segmentation.model.graph.decoder import GraphSettings
    from segmentation.model.graph.prefill import choose_attention

    base = _shared_model(ctx)
    device = torch.device(ctx["device"])
    auto = choose_attention("auto", device)
    batches = ctx["batches"]
    data = {"auto": {"kernel": auto.kernel, "why": auto.why}, "dtype": str(base.model.dtype), "kernels": {}}
    engines, first_logits = {}, {}
    for kernel in ("eager", "flex"):
        # Only the prefill runs here: no decode graphs to capture.
        engine = engines[kernel] = PaliGemmaEngine(
            base.model, base.processor, generation="graph", max_new_tokens=ctx["tokens"],
            graph=GraphSettings(buckets=tuple(sorted(set(batches))), use_graphs=False, prefill_attention=kernel))
        prefill = engine.decoder.prefiller
        rows = {}
        for batch in batches:
            started = time.perf_counter()
            figures = time_prefill(engine, batch, repeats=3, warmup=1)
            rows[str(batch)] = {"ms_per_image": figures["ms_per_image"], "prompt_length": figures["prompt_length"],
                                "first_call_s": round(time.perf_counter() - started - sum(figures["wall_s"]), 2)}
        data["kernels"][kernel] = {"chosen": prefill.kernel, "why": prefill.choice.why, "by_batch": rows,
                                   "compile_s": dict(prefill.compile_seconds)}
        ctx["log"](f"[prefill {kernel}] {prefill.kernel}: " + ", ".join(
            f"b={b} {r['ms_per_image']} ms/image" for b, r in rows.items()))
        first_logits[kernel] = _first_logits(engine, max(batches))
    eager, flex = first_logits["eager"], first_logits["flex"]
    data["agreement"] = {"rows": int(eager.shape[0]),
                         "argmax_equal": int((eager.argmax(-1) == flex.argmax(-1)).sum()),
                         "max_abs_dlogit": round(float((eager - flex).abs().max()), 5)}
    on_cuda = device.type == "cuda"
    flex_ran = data["kernels"]["flex"]["chosen"] == "flex"
    top = str(max(batches))
    ratio = {b: round(data["kernels"]["flex"]["by_batch"][b]["ms_per_image"]
                      / data["kernels"]["eager"]["by_batch"][b]["ms_per_image"], 3) for b in map(str, batches)}
    data["flex_over_eager"] = ratio
    summary = (f"auto: {auto.kernel}; " + "; ".join(
        f"b={b} eager {data['kernels']['eager']['by_batch'][b]['ms_per_image']} flex "
        f"{data['kernels']['flex']['by_batch'][b]['ms_per_image']} ms/image (x{ratio[b]})" for b in map(str, batches))
        + f"; first tokens equal {data['agreement']['argmax_equal']}/{data['agreement']['rows']}, max |dlogit| "
        f"{data['agreement']['max_abs_dlogit']}; flex compiles {data['kernels']['flex']['compile_s']}")
    if on_cuda:
        target = data["kernels"]["flex"]["by_batch"][top]["ms_per_image"]
        summary += f"; target <= 12 ms/image at b={top}: {'met' if target <= 12 else 'not met'} ({target})"
        if auto.kernel != "flex" or not flex_ran:
            return result("FAIL", f"flex_attention does not serve on {ctx['device']}: {auto.why} | {summary}", **data)
        return result("PASS", summary, **data)
    return result("INFO", f"on {device.type} ({summary})", **data)


def _first_logits(engine, batch: int):
    """The prefill's first-token logits of `batch` sample rows (float32, on the host)."""
    import torch
    from engine_timing import sample_batch

    images, prompts = sample_batch(batch, seed=5)
    inputs = engine.prepare(images, prompts)
    decoder = engine.decoder
    with torch.inference_mode():
        features = decoder.image_features(inputs["pixel_values"], None, share=False)
        index = torch.arange(batch, device=decoder.device)
        return decoder.prefiller.forward(index, inputs, features, None).float().cpu()


def phase_lora(ctx) -> dict:
    import tempfile

    import torch
    from bench_lora import time_steps, write_random_lora

    from segmentation.model.engine import PaliGemmaEngine
    from segmentation.model.graph.decoder import GraphSettings

    base = _shared_model(ctx)
    on_cuda = ctx["device"].startswith("cuda")
    rows = max(ctx["batches"])
    buckets = tuple(sorted({1, rows}))
    plain = PaliGemmaEngine(base.model, base.processor, generation="graph", max_new_tokens=ctx["tokens"],
                            graph=GraphSettings(buckets=buckets))
    started = time.perf_counter()
    plain.decoder  # noqa: B018 -- buffers and graphs
    data = {"rows": rows, "adapters": ctx["adapters"], "rank": ctx["lora_rank"],
            "plain": {"setup_s": round(time.perf_counter() - started, 2),
                      "capture_s": round(plain.decoder.capture_seconds, 2)}}
    data["plain"]["base_only"] = time_steps(plain, [None] * rows)
    del plain  # its decoder holds the layers bare: attaching adapters below wraps them
    with tempfile.TemporaryDirectory(prefix="gpu-check-lora-") as tmp:
        directories = {f"check/lora-{i}": write_random_lora(base.model, Path(tmp) / f"lora-{i}", rank=ctx["lora_rank"],
                                                            seed=i + 1)
                       for i in range(ctx["adapters"])}
        adapted = PaliGemmaEngine(base.model, base.processor, generation="graph", max_new_tokens=ctx["tokens"],
                                  graph=GraphSettings(buckets=buckets, max_lora_rank=max(16, ctx["lora_rank"])))
        started = time.perf_counter()
        adapted.attach_adapters(directories)
        attach_s = time.perf_counter() - started
        started = time.perf_counter()
        decoder = adapted.decoder
        data["adapted"] = {"attach_s": round(attach_s, 2), "setup_s": round(time.perf_counter() - started, 2),
                           "capture_s": round(decoder.capture_seconds, 2),
                           "captured": sorted(decoder.graphs),
                           "lora_mib": round(decoder.lora.reserved_bytes() / 2**20, 1),
                           "slots": {a: adapted.adapter_status(a) for a in directories}}
    ids = list(directories)
    mixed = [ids[i // 2 % len(ids)] if i % 2 else None for i in range(rows)]  # every other row an adapter
    data["adapted"]["base_only"] = time_steps(adapted, [None] * rows)
    data["adapted"]["mixed"] = time_steps(adapted, mixed)
    data["adapted"]["alone"] = time_steps(adapted, [ids[0]])
    base_ms = data["plain"]["base_only"]["step_ms"]
    mixed_ms = data["adapted"]["mixed"]["step_ms"]
    data["mixed_over_plain_base"] = round(mixed_ms / base_ms, 3)
    data["mixed_over_adapted_base"] = round(mixed_ms / data["adapted"]["base_only"]["step_ms"], 3)
    want = "graph" if on_cuda else "fixed"
    stray = {name: r["paths"] for name, r in data["adapted"].items() if isinstance(r, dict) and "paths" in r
             and set(r["paths"]) != {want}}
    summary = (f"{rows} rows, half with {len(ids)} rank-{ctx['lora_rank']} adapters: step {mixed_ms} ms against "
               f"{base_ms} ms base-only without adapters (x{data['mixed_over_plain_base']}; target <= 1.2: "
               f"{'met' if data['mixed_over_plain_base'] <= 1.2 else 'not met'}) and "
               f"{data['adapted']['base_only']['step_ms']} ms base-only with them; capture "
               f"{data['adapted']['capture_s']} s with adapters vs {data['plain']['capture_s']} s; stacked weights "
               f"{data['adapted']['lora_mib']} MiB")
    if on_cuda:
        data["gpu_reserved_mib"] = round(torch.cuda.memory_reserved() / 2**20, 1)
    if stray:
        return result("FAIL", f"steps off the {want} path: {stray} | {summary}", **data)
    return result("PASS", summary, **data)


WORKER_PHASES = {"tiny": phase_tiny, "kernels": phase_kernels, "capture": phase_capture, "speed": phase_speed,
                 "agreement": phase_agreement, "prefill": phase_prefill, "lora": phase_lora,
                 "invariance": phase_invariance, "service": phase_service}


def exception_reason(exc: BaseException) -> str:
    """An exception in one line: its first line, and where the message goes on (a server's log), the line
    that says why it stopped."""
    lines = [line.strip() for line in f"{type(exc).__name__}: {exc}".strip().splitlines() if line.strip()]
    why = next((line for line in reversed(lines[1:]) if re.search(r"FATAL|stopping the server|Error", line)), None)
    return (lines[0] + (f" ... {why}" if why else ""))[:800]


def worker_main(names: list[str], settings: dict) -> int:
    """Run these phases in this process, announcing each and printing its result as one protocol line."""
    ctx = {**settings, "state": {}, "log": lambda line: print(line, flush=True)}
    for name in names:
        print(f"{MARK} start {name}", flush=True)
        try:
            outcome = WORKER_PHASES[name](ctx)
        except BaseException as exc:  # noqa: BLE001 -- a phase's failure is its result; the next may still run
            outcome = result("FAIL", exception_reason(exc), traceback=traceback.format_exc()[-6000:])
        print(f"{MARK} result {name} {json.dumps(outcome, default=str)}", flush=True)
    return 0


# ------------------------------------------------------------------------------------ the runner

class Runner:
    """Runs the selected phases in order, each group in a worker process, and keeps the report on disk."""

    def __init__(self, args, settings: dict, selected: list[str]):
        self.args, self.settings, self.selected = args, settings, selected
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.log_file = args.out.with_suffix(".log").open("a")
        self.report = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
                       "settings": settings, "budget_s": args.budget, "phases": {}, "lines": []}

    def print(self, line: str) -> None:
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def save(self) -> None:
        self.report["wall_s"] = round(time.monotonic() - self.started, 1)
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.args.out.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        temporary.replace(self.args.out)

    def record(self, name: str, outcome: dict, seconds: float, budget: float | None) -> None:
        outcome = {**outcome, "seconds": round(seconds, 1), "budget_s": budget}
        self.report["phases"][name] = outcome
        shown = f"{seconds:.0f}s/{budget:.0f}s" if budget else "-"
        line = f"{outcome['status']:<4}  {name:<10}  {shown:>9}  {outcome['reason']}"
        self.report["lines"].append(line)
        self.print(line)
        self.save()

    def budget(self, name: str) -> float:
        own = (PHASES[name][1] if self.args.quick else PHASES[name][0]) * self.settings.get("budget_scale", 1)
        return min(own, self.deadline - time.monotonic())

    def run(self) -> int:
        self.save()
        for group in (("env",), *GROUPS):
            names = [n for n in group if n in self.selected]
            for name in [n for n in group if n not in self.selected]:
                self.record(name, result("SKIP", "left out (--skip / --only)"), 0.0, None)
            if not names:
                continue
            if names == ["env"]:
                start = time.monotonic()
                self.record("env", self.env_phase(), time.monotonic() - start, self.budget("env"))
            elif names == ["pytest"]:
                self.run_pytest()
            else:
                self.run_group(names)
        failed = [n for n, o in self.report["phases"].items() if o["status"] == "FAIL"]
        self.report["failed"] = failed
        self.save()
        self.print("gpu-check summary:")  # every phase's line again, together at the end of the output
        for line in self.report["lines"]:
            self.print(line)
        self.print(f"gpu-check: {len(failed)} phase(s) failed{': ' + ', '.join(failed) if failed else ''}; "
                   f"{self.report['wall_s']}s; report {self.args.out}")
        return 1 if failed else 0

    def env_phase(self) -> dict:
        import importlib

        import torch

        from segmentation.serving.gpu import driver_version

        data = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                "driver": driver_version(), "cpus": os.cpu_count(), "modules": {}}
        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(0)
            data.update(gpu=properties.name, capability=list(torch.cuda.get_device_capability(0)),
                        memory_gib=round(properties.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
        needed = ("transformers", "bentoml", "pydantic", "pycocotools", "httpx", "psutil", "cv2", "peft", "jax",
                  "triton", "pytest", "prometheus_client")
        for module in needed:
            try:
                data["modules"][module] = getattr(importlib.import_module(module), "__version__", "present")
            except Exception as exc:  # noqa: BLE001 -- reported, the phases that need it fail on their own
                data["modules"][module] = f"missing ({type(exc).__name__})"
        missing = [m for m, v in data["modules"].items() if str(v).startswith("missing")]
        self.report["env"] = data
        where = (f"{data.get('gpu', 'no GPU')} (sm{''.join(map(str, data.get('capability', [])))}, "
                 f"{data.get('memory_gib')} GiB), driver {data['driver']}, torch {data['torch']} "
                 f"(CUDA {data['torch_cuda']})")
        if missing:
            return result("FAIL", f"{where}; missing: {', '.join(missing)} (carry .gpu: "
                                  "bash ../shared/gpu/prepare.sh .)", **data)
        return result("PASS", where, **data)

    def spawn(self, command: list[str], env: dict | None = None):
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   bufsize=1, env={**os.environ, **(env or {})}, start_new_session=True)
        lines: queue.Queue = queue.Queue()

        def pump() -> None:
            for line in process.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        return process, lines

    def stop(self, process) -> None:
        from servers import kill_tree  # tests/servers.py: a bentoml server's workers are in groups of their own

        with contextlib.suppress(Exception):
            kill_tree(process.pid)

    def run_group(self, names: list[str]) -> None:
        remaining = list(names)
        while remaining:
            first = remaining[0]
            if self.budget(first) < 5:
                for name in remaining:
                    self.record(name, result("SKIP", f"no time left in --budget {self.args.budget}s"), 0.0, None)
                return
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(remaining),
                       "--settings", json.dumps(self.settings)]
            process, lines = self.spawn(command)
            current, budget = first, self.budget(first)
            began = time.monotonic()
            tail: list[str] = []
            while True:
                try:
                    line = lines.get(timeout=max(0.1, began + budget - time.monotonic()))
                except queue.Empty:
                    self.stop(process)
                    self.record(current, result("FAIL", f"over its budget of {budget:.0f}s: stopped "
                                                        f"(last lines: {' | '.join(tail[-3:])[-400:]})"),
                                time.monotonic() - began, budget)
                    remaining.remove(current)
                    break
                if line is None:  # the worker ended
                    process.wait()
                    if current in remaining:
                        self.record(current, result("FAIL", f"the worker exited with status {process.returncode} "
                                                            f"(last lines: {' | '.join(tail[-3:])[-600:]})"),
                                    time.monotonic() - began, budget)
                        remaining.remove(current)
                    break
                if line.startswith(f"{MARK} start "):
                    current = line.split()[2]
                    budget, began = self.budget(current), time.monotonic()
                    if budget < 5:
                        self.stop(process)
                        for name in remaining:
                            self.record(name, result("SKIP", f"no time left in --budget {self.args.budget}s"), 0.0,
                                        None)
                        return
                elif line.startswith(f"{MARK} result "):
                    _, _, name, payload = line.split(" ", 3)
                    self.record(name, json.loads(payload), time.monotonic() - began, budget)
                    remaining.remove(name)
                else:
                    tail = (tail + [line])[-20:]
                    self.print(f"  {line}")

    def run_pytest(self) -> None:
        budget = self.budget("pytest")
        if budget < 5:
            self.record("pytest", result("SKIP", f"no time left in --budget {self.args.budget}s"), 0.0, None)
            return
        command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                   "tests/model/test_cuda.py"]
        process, lines = self.spawn(command)
        began, output = time.monotonic(), []
        while True:
            try:
                line = lines.get(timeout=max(0.1, began + budget - time.monotonic()))
            except queue.Empty:
                self.stop(process)
                self.record("pytest", result("FAIL", f"over its budget of {budget:.0f}s: stopped", output=output[-60:]),
                            time.monotonic() - began, budget)
                return
            if line is None:
                break
            output.append(line)
            self.print(f"  {line}")
        process.wait()
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?)", "\n".join(output[-5:]))
        counts = {kind: int(n) for n, kind in found}
        status = "PASS" if process.returncode == 0 and counts.get("passed", 0) > 0 else "FAIL"
        summary = next((line for line in reversed(output) if re.search(r"passed|failed|skipped|error", line)), "")
        self.record("pytest", result(status, f"pytest -m cuda (exit {process.returncode}): {summary.strip('= ')}",
                                     counts=counts, output=output[-80:]), time.monotonic() - began, budget)


def refusal(device: str) -> str | None:
    """Why this machine cannot run the check (None: it can)."""
    if not device.startswith("cuda"):
        return None
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return f"gpu-check needs a CUDA GPU, and torch does not even import here ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
        return (f"gpu-check needs a CUDA GPU and torch sees none (torch {torch.__version__}, {build}; "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): run it on the GPU host, "
                "bash .gpu/run.sh python3 scripts/gpu_check.py")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the short run (about 3.5 minutes of phases)")
    parser.add_argument("--skip", default="", help="comma-separated phases to leave out")
    parser.add_argument("--only", default="", help="comma-separated phases to run (the others are skipped)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks-out" / "gpu-check.json",
                        help="the JSON report (rewritten after every phase); the log goes beside it (.log)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".fixtures" / "bench",
                        help="where the 3b fixture is written once (shared with bench_gpu.py)")
    parser.add_argument("--size", default="3b-448", help="fixture size of the 3b phases (scripts/make_tiny_model.py)")
    parser.add_argument("--device", default="cuda",
                        help="cuda (cuda:N) on the GPU host; cpu only for the test suite's smoke run (tiny size)")
    parser.add_argument("--budget", type=float, help="total seconds for every phase (default 480, --quick 300)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker.split(","), json.loads(args.settings))

    why = refusal(args.device)
    if why:
        print(f"REFUSED: {why}", file=sys.stderr, flush=True)
        return 2
    if args.device == "cpu" and args.size != "tiny":
        parser.error("--device cpu is the test suite's smoke run: use it with --size tiny")
    names = list(PHASES)
    only = [n for n in args.only.split(",") if n]
    skip = [n for n in args.skip.split(",") if n]
    unknown = sorted(set(only + skip) - set(names))
    if unknown:
        parser.error(f"unknown phases {unknown}; the phases: {', '.join(names)}")
    selected = [n for n in names if (not only or n in only) and n not in skip]
    profile = QUICK if args.quick else DEFAULTS
    scale = 3 if args.device == "cpu" else 1  # the CPU smoke run: 2 busy cores, budgets with room to spare
    args.budget = args.budget or profile["budget"] * scale
    settings = {**{k: v for k, v in profile.items() if k != "budget"}, "device": args.device, "size": args.size,
                "cache_dir": str(args.cache_dir), "quick": args.quick}
    if args.device == "cpu":  # the smoke run: small enough for a test
        settings.update(tiny_rows=[1, 3], tiny_tokens=12, tokens=8, batches=[1, 2], buckets=[1, 2], lora_rank=4,
                        invariance_rows=2, invariance_tokens=5, clients=[1, 2], requests=2, budget_scale=scale)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".log").write_text("")
    runner = Runner(args, settings, selected)
    runner.print(f"gpu-check: phases {', '.join(selected)}; budget {args.budget:.0f}s"
                 f"{' (quick)' if args.quick else ''}; report {args.out}")
    return runner.run()


if __name__ == "__main__":
    sys.exit(main())
