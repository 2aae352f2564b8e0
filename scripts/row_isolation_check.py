#!/usr/bin/env python
"""Batched ≡ solo on this CPU, bit for bit, with and without the graph engine's row isolation; prints JSON.

Rows of batches of 2, 4 and 8 (distinct random pictures, mixed prompts, `--tokens` forced tokens each)
against each request alone: `tokens_equal` counts rows with the same token ids, `bits_equal` those whose
log-probabilities are the same bits too. "isolated" is the engine as it serves (each prompt prefilled
alone; the start-up check's arrangement of the steps); "not isolated" prefills the batch together.

    .venv/bin/python scripts/row_isolation_check.py .fixtures/bench/medium-seed0/paligemma --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def main(argv: list[str] | None = None) -> int:
    from engine_timing import sample_batch

    from segmentation.model.engine import PaliGemmaEngine
    from segmentation.model.graph.decoder import GraphSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a save_pretrained PaliGemma directory")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args(argv)
    engine = PaliGemmaEngine.from_pretrained(args.model_dir, device="cpu", dtype=args.dtype, generation="graph",
                                             batch_invariant=args.dtype == "float32",
                                             graph=GraphSettings(buckets=(1, 2, 4, 8)), max_new_tokens=args.tokens)
    decoder = engine.decoder
    report = {"dtype": args.dtype, "row_isolation": engine.row_isolation, "row_check": engine.row_check,
              "loadavg_start": os.getloadavg()}
    images, prompts = sample_batch(8)
    for isolated in (True, False):
        decoder.per_row_prefill = isolated
        for size in (2, 4, 8):
            budgets = [args.tokens] * size
            together = engine.generate(images[:size], prompts[:size], max_new_tokens=budgets)
            alone = [engine.generate([image], [prompt], max_new_tokens=[args.tokens])[0]
                     for image, prompt in zip(images[:size], prompts[:size])]
            same = [(a.token_ids == b.token_ids, a.token_logprobs == b.token_logprobs) for a, b in zip(together, alone)]
            report[f"{'isolated' if isolated else 'not isolated'}, batch {size}"] = {
                "tokens_equal": sum(ids for ids, _ in same), "bits_equal": sum(ids and bits for ids, bits in same)}
    report["loadavg_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
