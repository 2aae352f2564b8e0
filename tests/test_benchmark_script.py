"""scripts/benchmark.py against a real tiny-model server: it runs, answers every request, writes its report.

No timing assertions: the figures depend on the machine (docs/benchmarks.md has them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_script_writes_a_complete_report(tiny_fixtures, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--start", "--size", "tiny",
         "--fixtures", str(tiny_fixtures), "--requests", "8", "--warmup", "2", "--concurrency", "1,4",
         "--max-new-tokens", "24", "--micro", "--compare-adapters", "2", "--out", str(out), "--plot", str(png)],
        cwd=ROOT, capture_output=True, text=True, timeout=560,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert png.stat().st_size > 1000

    assert report["settings"]["max_new_tokens"] == 24
    assert {"nproc", "cpu", "memory_gib"} <= set(report["machine"])
    levels = report["configs"]["adaptive"]["levels"]
    assert [level["concurrency"] for level in levels] == [1, 4]
    for level in levels:
        assert level["requests"] == level["ok"] == 8
        assert level["errors"] == {}
        assert level["requests_per_s"] > 0 and level["images_per_s"] > 0
        assert set(level["latency_s"]) == {"p50", "p95", "p99", "mean"}
        assert level["latency_s"]["p50"] <= level["latency_s"]["p95"] <= level["latency_s"]["p99"]
        # The engine's batch histogram and stage times come from /metrics deltas over the level.
        assert sum(level["batch_size_histogram"].values()) == level["batches"] >= 1
        assert 1 <= level["batch_size_mean"] <= 4
        assert {"decode_input", "generate", "mask_decode", "encode"} <= set(level["stage_seconds_mean"])
        assert 0 < level["generated_tokens_mean"] <= 24

    # Base-only against base + 2 adapters mixed, on one server at the highest concurrency.
    adapters = report["adapters"]
    assert adapters["adapters"] == 2 and adapters["concurrency"] == 4
    for name in ("base_only", "mixed"):
        level = adapters["levels"][name]
        assert level["requests"] == level["ok"] == 8 and level["errors"] == {}
        assert 1 <= level["batch_size_mean"] <= 4
    assert adapters["ratio"] > 0 and report["targets"]["adapter_mix_fraction"]["value"] == adapters["ratio"]

    micro = report["micro"]
    assert micro["recompiled_after_warmup"] is False
    assert micro["total_ms_per_object_batch1"] > 0
    assert report["targets"]["no_recompilation"]["met"] is True
