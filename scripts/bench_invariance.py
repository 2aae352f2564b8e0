#!/usr/bin/env python
"""Batched ≡ solo and the cost of the batch-invariant mode (SEG_BATCH_INVARIANT), in one run; writes JSON.

For each dtype and each mode (off: PyTorch's kernels; on: segmentation.model.invariant's):

1. **invariance**: `--rows` requests (distinct random pictures) generated together, then each alone,
   `--tokens` tokens each (forced budgets); a row counts as equal when its token ids match, and
   as bit-equal when its log-probabilities match exactly too. Two prompt sets: `mixed` (mixed prompts,
   as in docs/benchmarks.md's baseline: the engine pads each batch to its longest prompt, so a row's
   padded length differs alone and batched) and `uniform` (prompts of one token length: one padded
   shape alone and batched, what a fixed-shape engine gives every row).
2. **cost**: prefill seconds and decode-step milliseconds at batch `--batches` (scripts/engine_timing.py),
   and the mode's step cost over the mode off, per batch.

On a GPU host (the 3B fixture is drawn once into --cache-dir, as scripts/bench_gpu.py does):

    .venv/bin/python scripts/bench_invariance.py --out benchmarks-out/invariance.json
    # CPU smoke run (Triton's interpreter, a 56 px random model; the test suite runs this):
    .venv/bin/python scripts/bench_invariance.py --device cpu --size micro --rows 2 --tokens 5 \\
        --task detect --batches 1 --dtypes float32 --out /tmp/invariance.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# A 56 px picture (16 image tokens) on the tiny fixture's shapes: the CPU smoke size, quick under the
# interpreter. Registered into make_tiny_model's sizes by this script only.
MICRO_IMAGE_SIZE = 56
MIXED_PROMPTS = ("cat", "cat ; dog", "person", "car ; bus ; truck", "the man on the left", "bird")
UNIFORM_PROMPTS = ("cat", "dog", "car", "bus", "bird", "tree")  # one token each in both tokenizers' words


def sizes() -> dict:
    import make_tiny_model

    make_tiny_model.SIZES.setdefault("micro", dict(make_tiny_model.SIZES["tiny"], image_size=MICRO_IMAGE_SIZE))
    return make_tiny_model.SIZES


def fixture(size: str, cache_dir: Path, device: str, log) -> Path:
    """DIR/paligemma for `size`, written once (bfloat16 weights on a GPU, as bench_gpu.py's)."""
    from make_tiny_model import write_fixtures

    sizes()
    on_gpu = device.startswith("cuda")
    directory = cache_dir / f"{size}-{'gpu-bf16' if on_gpu else 'cpu'}"
    if not (directory / "paligemma" / "config.json").is_file():
        start = time.perf_counter()
        write_fixtures(directory, size=size, vae="random", device=device, dtype="bfloat16" if on_gpu else "float32")
        log(f"[fixture] wrote {size} into {directory} in {time.perf_counter() - start:.1f}s")
    return directory / "paligemma"


def pictures(count: int, side: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def first_difference(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def invariance(engine, prompts: list, images: list, tokens: int) -> dict:
    """The batch of all rows against each row alone."""
    together = engine.generate(images, prompts, max_new_tokens=[tokens] * len(prompts))
    alone = [engine.generate([image], [prompt], max_new_tokens=[tokens])[0] for image, prompt in zip(images, prompts)]
    divergence = [first_difference(a.token_ids, b.token_ids) for a, b in zip(together, alone)]
    deltas = [abs(x - y) for a, b in zip(together, alone) for x, y in list(zip(a.token_logprobs, b.token_logprobs))[:5]]
    return {
        "rows": len(prompts),
        "rows_equal": sum(d is None for d in divergence),
        "rows_bit_equal": sum(a.token_ids == b.token_ids and a.token_logprobs == b.token_logprobs
                              for a, b in zip(together, alone)),
        "first_divergence": divergence,
        "max_abs_dlogprob_first5": max(deltas, default=0.0),
        "tokens": sum(len(g.token_ids) for g in together),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="3b-448", help="a make_tiny_model.py size, or micro (56 px tiny)")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu (Triton's interpreter)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--modes", default="off,on", help="off: PyTorch's kernels; on: batch-invariant")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--batches", default="1,8,32", help="batch sizes of the cost measurement ('' skips it)")
    parser.add_argument("--cost-tokens", type=int, default=None, help="tokens per row when timing (default --tokens)")
    parser.add_argument("--task", choices=("segment", "detect"), default="segment",
                        help="the prompts' task (detect: a box fits in 5 tokens, for short smoke runs)")
    parser.add_argument("--generation", default="fast", help="PaliGemmaEngine(generation=...)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".fixtures" / "bench",
                        help="where the fixture is written once (shared with bench_gpu.py and gpu_check.py)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if _cuda() else "cpu")
    if device == "cpu":
        # Before Triton is imported: the kernels then run on CPU tensors (slow; a smoke run).
        os.environ["TRITON_INTERPRET"] = "1"
    if args.size not in sizes():
        parser.error(f"--size must be one of {sorted(sizes())}")

    return run(args, device)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args, device: str) -> int:
    import contextlib

    import torch
    from engine_timing import time_engine

    from segmentation.model import invariant
    from segmentation.model.engine import PaliGemmaEngine
    from segmentation.model.invariant.interpreter import position_invariant_dot

    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    kind = torch.device(device).type
    modes = [m for m in args.modes.split(",") if m]
    if "on" in modes and not invariant.available(kind):
        log(f"[mode] batch-invariant kernels unavailable on {device}: measuring the mode off only")
        modes = [m for m in modes if m != "on"]
    model_dir = fixture(args.size, args.cache_dir, device, log)
    report = {"size": args.size, "device": device, "generation": args.generation, "rows": args.rows,
              "tokens": args.tokens, "interpreter": kind == "cpu", "gpu": torch.cuda.get_device_name(0)
              if kind == "cuda" else None, "torch": torch.__version__, "results": []}
    batches = [int(b) for b in args.batches.split(",") if b]
    for dtype_name in [d for d in args.dtypes.split(",") if d]:
        dtype = getattr(torch, dtype_name)
        engine = PaliGemmaEngine.from_pretrained(model_dir, device=device, dtype=dtype, generation=args.generation)
        side = engine.image_size
        for mode in modes:
            on = mode == "on"
            # Under the CPU interpreter, tl.dot runs on OpenBLAS, which rounds a row by its place in a
            # block; the position-invariant dot models the GPU's tensor cores (interpreter.py).
            scope = contextlib.ExitStack()
            if on:
                scope.enter_context(invariant.batch_invariant(kind))
                if kind == "cpu":
                    scope.enter_context(position_invariant_dot())
            with scope:
                entry = {"dtype": dtype_name, "mode": mode, "describe": invariant.describe(kind, dtype)}
                # Warm-up: Triton compiles each kernel on first use.
                engine.generate(pictures(1, side, 99), [_prompt("cat", args.task)], max_new_tokens=[2])
                for name, words in (("mixed", MIXED_PROMPTS), ("uniform", UNIFORM_PROMPTS)):
                    start = time.perf_counter()
                    prompts = [_prompt(words[i % len(words)], args.task) for i in range(args.rows)]
                    result = invariance(engine, prompts, pictures(args.rows, side), args.tokens)
                    result["seconds"] = round(time.perf_counter() - start, 2)
                    entry[f"invariance_{name}"] = result
                    log(f"[{dtype_name} {mode} {name}] batched==solo {result['rows_equal']}/{result['rows']} rows "
                        f"(bit-equal {result['rows_bit_equal']}); first divergence {result['first_divergence']}; "
                        f"max |dlogprob| first 5 {result['max_abs_dlogprob_first5']:.2e}; {result['seconds']}s")
                cost = []
                for batch in batches:
                    prompts = [_prompt(MIXED_PROMPTS[i % len(MIXED_PROMPTS)], args.task) for i in range(batch)]
                    figures = time_engine(engine, pictures(batch, side, 7), prompts, args.cost_tokens or args.tokens)
                    cost.append({"batch": batch, "prefill_s": round(figures["prefill_s"], 4),
                                 "step_ms": None if figures["step_ms"] is None else round(figures["step_ms"], 3)})
                    log(f"[{dtype_name} {mode} cost b={batch}] prefill {cost[-1]['prefill_s']}s "
                        f"step {cost[-1]['step_ms']}ms")
                entry["cost"] = cost
            report["results"].append(entry)
        del engine
        if kind == "cuda":
            torch.cuda.empty_cache()
    report["overhead"] = overhead(report["results"])
    for item in report["overhead"]:
        log(f"[overhead {item['dtype']} b={item['batch']}] step x{item['step_ratio']} prefill x{item['prefill_ratio']}")
    report["log"] = lines
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    log(f"wrote {args.out}")
    return 0


def _prompt(text: str, task: str):
    from segmentation.model.prompts import parse_prompt

    return parse_prompt(text, task)


def overhead(results: list[dict]) -> list[dict]:
    """Per dtype and batch: the mode's step and prefill time over the mode off (1.25 = 25% slower)."""
    by_key = {(r["dtype"], r["mode"], c["batch"]): c for r in results for c in r["cost"]}
    rows = []
    for (dtype, mode, batch), on in sorted(by_key.items()):
        off = by_key.get((dtype, "off", batch))
        if mode != "on" or off is None:
            continue
        step = on["step_ms"] / off["step_ms"] if on["step_ms"] and off["step_ms"] else None
        rows.append({"dtype": dtype, "batch": batch, "step_ratio": None if step is None else round(step, 3),
                     "prefill_ratio": round(on["prefill_s"] / off["prefill_s"], 3)})
    return rows


if __name__ == "__main__":
    sys.exit(main())
