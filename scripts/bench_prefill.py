#!/usr/bin/env python
"""Prefill per image of the graph engine: this tree's kernels against another commit's prefill (main), side by
side in one run.

    .venv/bin/python scripts/bench_prefill.py --size medium --ref main --batches 1,8 --rounds 4 \\
        --out benchmarks-out/prefill.json

A prefill here is `StaticDecoder.prefill` of a batch into slots 0..n-1 as the engine runs it: the vision tower,
the language model over image + prompt, the keys into the static cache, the first token's grammar and choice
(`sample_batch`: distinct random 224 px pictures, mixed prompts). Each configuration runs in a worker process
of its own (the tree it measures first on `sys.path`): `main@REF` (the other commit, exported with `git
archive`), and this tree's `eager` and `flex` kernels (SEG_PREFILL_ATTENTION). Every round starts one worker
per configuration, in an order that rotates from round to round; a worker warms up (flex compiles then) and
times `--repeats` prefills per batch size. The machine may be shared: the report keeps every sample, each
round's median and the load average around each worker, and the headline is the median over all samples
(wall time; the workers' CPU time is kept beside it). On 2 cores shared with other jobs, two torch threads
make some rounds 10-30x slower (a parallel region waits for the thread whose core is taken);
`--threads 1` with the CPU-time figures is the stable comparison there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def time_prefill(engine, batch: int, repeats: int, *, warmup: int = 2, seed: int = 0) -> dict:
    """Wall and CPU seconds of `repeats` prefills of `batch` rows on `engine`'s graph decoder (after `warmup`)."""
    import torch
    from engine_timing import sample_batch

    images, prompts = sample_batch(batch, seed=seed)
    inputs = engine.prepare(images, prompts)
    specs = [engine.row_spec(p, 8) for p in prompts]
    decoder = engine.decoder
    synchronize = torch.cuda.synchronize if decoder.device.type == "cuda" else (lambda: None)
    wall, cpu = [], []
    for index in range(warmup + repeats):
        synchronize()
        tick, tock = time.perf_counter(), time.process_time()
        decoder.reset()
        decoder.prefill(list(range(batch)), inputs, specs)
        synchronize()
        if index >= warmup:
            wall.append(time.perf_counter() - tick)
            cpu.append(time.process_time() - tock)
    return {"batch": batch, "prompt_length": int(inputs["input_ids"].shape[1]), "wall_s": wall, "cpu_s": cpu,
            "ms_per_image": round(statistics.median(wall) * 1000 / batch, 2)}


def worker(source: Path, fixture: Path, batches: list[int], repeats: int, attention: str | None,
           threads: int | None = None) -> dict:
    """One configuration: the `segmentation` package of `source`, its graph engine on `fixture`."""
    sys.path.insert(0, str(source))
    import torch

    if threads:
        torch.set_num_threads(threads)

    from segmentation.model.engine import PaliGemmaEngine
    from segmentation.model.graph.decoder import GraphSettings

    options = {"buckets": tuple(sorted(set(batches)))}
    if attention is not None:
        options["prefill_attention"] = attention
    engine = PaliGemmaEngine.from_pretrained(fixture, device="cpu" if not torch.cuda.is_available() else None,
                                             generation="graph", graph=GraphSettings(**options))
    import segmentation

    status = engine.graph_status()  # builds nothing; the decoder is built by the first prefill
    results = [time_prefill(engine, batch, repeats) for batch in batches]
    return {"package": str(Path(segmentation.__file__).parent), "threads": torch.get_num_threads(),
            "prefill": engine.graph_status().get("prefill", status.get("prefill")), "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium", help="fixture size (scripts/make_tiny_model.py)")
    parser.add_argument("--fixtures", type=Path, help="a fixture folder (DIR/paligemma); default: the cache's")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".fixtures" / "bench")
    parser.add_argument("--ref", default="main", help="the commit whose prefill is the baseline ('' for none)")
    parser.add_argument("--kernels", default="eager,flex", help="this tree's prefill kernels to measure")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads of each worker (default: torch's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks-out" / "prefill.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(Path(spec["source"]), Path(spec["fixture"]), batches, args.repeats,
                                spec.get("attention"), args.threads)), flush=True)
        return 0

    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark import export_commit, fixtures_for

    fixture = ((args.fixtures or fixtures_for(args.size, args.cache_dir, seed=0)) / "paligemma").resolve()
    configs = {}
    if args.ref:
        commit, source = export_commit(args.ref, args.cache_dir)
        configs[f"main@{commit}"] = {"source": str(source)}
    for kernel in filter(None, args.kernels.split(",")):
        configs[kernel] = {"source": str(ROOT), "attention": kernel}
    samples: dict[str, list[dict]] = {name: [] for name in configs}
    names = list(configs)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            load_before = os.getloadavg()[0]
            spec = {**configs[name], "fixture": str(fixture)}
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec), "--batches", args.batches,
                                   "--repeats", str(args.repeats), *(["--threads", str(args.threads)] if args.threads
                                                                     else [])],
                                  cwd=configs[name]["source"], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": ""})
            if done.returncode != 0:
                raise SystemExit(f"{name}: the worker failed:\n{done.stderr[-3000:]}")
            report = json.loads(done.stdout.strip().splitlines()[-1])
            report.update(round=round_index + 1, load_before=round(load_before, 2),
                          load_after=round(os.getloadavg()[0], 2))
            samples[name].append(report)
            line = "  ".join(f"b={r['batch']} {r['ms_per_image']} ms/image" for r in report["results"])
            print(f"[round {round_index + 1}] {name:<14} {line}  (load {load_before:.1f} -> "
                  f"{report['load_after']:.1f}; {report['package']})", flush=True)
    summary = {}
    for name, reports in samples.items():
        for batch in batches:
            rows = [r for report in reports for r in report["results"] if r["batch"] == batch]
            wall = [s for r in rows for s in r["wall_s"]]
            cpu = [s for r in rows for s in r["cpu_s"]]
            summary.setdefault(name, {})[str(batch)] = {
                "ms_per_image": round(statistics.median(wall) * 1000 / batch, 2),
                "cpu_ms_per_image": round(statistics.median(cpu) * 1000 / batch, 2),
                "rounds_ms_per_image": [r["ms_per_image"] for r in rows],
                "prompt_length": rows[0]["prompt_length"],
            }
    baseline = next((n for n in names if n.startswith("main@")), None)
    if baseline:
        for name in names:
            for batch, entry in summary[name].items():
                base = summary[baseline][batch]
                entry["x_main"] = round(entry["ms_per_image"] / base["ms_per_image"], 3)
                entry["cpu_x_main"] = round(entry["cpu_ms_per_image"] / base["cpu_ms_per_image"], 3)
    result = {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "fixture": str(fixture),
              "batches": batches, "rounds": args.rounds, "repeats": args.repeats, "cpus": os.cpu_count(),
              "threads": args.threads,
              "summary": summary, "samples": samples}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name in names:
        print(f"{name:<14} " + "  ".join(
            f"b={b}: {e['ms_per_image']} ms/image (cpu {e['cpu_ms_per_image']})"
            + (f" x{e['x_main']} of main (cpu x{e['cpu_x_main']})" if "x_main" in e else "")
            for b, e in summary[name].items()), flush=True)
    print(f"report {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
