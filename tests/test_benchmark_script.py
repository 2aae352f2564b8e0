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
         "--max-new-tokens", "24", "--micro", "--compare-adapters", "2", "--engine-micro", "--engine-batches", "1,2",
         "--engine-tokens", "24", "--out", str(out), "--plot", str(png)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
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
        assert set(level["latency_s"]) == {"p50", "p90", "p95", "p99", "mean"}
        assert level["latency_s"]["p50"] <= level["latency_s"]["p90"] <= level["latency_s"]["p95"] \
            <= level["latency_s"]["p99"]
        # The engine's batch histogram and stage times come from /metrics deltas over the level.
        assert sum(level["batch_size_histogram"].values()) == level["batches"] >= 1
        assert 1 <= level["batch_size_mean"] <= 4
        assert {"decode_input", "generate", "mask_decode", "encode"} <= set(level["stage_seconds_mean"])
        assert 0 < level["generated_tokens_mean"] <= 24
    # Streamed through /v1/chat/completions at 1 client (--stream-levels defaults to 1 and 16).
    assert report["settings"]["stream_levels"] == [1]
    streamed = levels[0]["stream"]
    assert streamed["requests"] == streamed["ok"] == 8 and streamed["errors"] == {}
    assert 0 < streamed["time_to_first_token_s"]["p50"] <= streamed["time_to_first_token_s"]["p90"]
    assert streamed["time_to_first_token_s"]["p90"] <= streamed["latency_s"]["p90"]
    assert streamed["requests_per_s"] > 0 and "stream" not in levels[1]

    # Base-only against base + 2 adapters mixed, on one server at the highest concurrency.
    adapters = report["adapters"]
    assert adapters["adapters"] == 2 and adapters["concurrency"] == 4
    for name in ("base_only", "mixed"):
        level = adapters["levels"][name]
        assert level["requests"] == level["ok"] == 8 and level["errors"] == {}
        assert 1 <= level["batch_size_mean"] <= 4
    assert adapters["ratio"] > 0 and report["targets"]["adapter_mix_fraction"]["value"] == adapters["ratio"]

    engine_rows = report["engine_micro"]["rows"]
    settings = {row["setting"] for row in engine_rows}
    assert {"hf-generate", "fast", "bare loop (hf-generate model)"} <= settings
    assert {row["batch"] for row in engine_rows} == {1, 2}
    for row in engine_rows:
        assert row["prefill_s"] > 0 and len(row["prefill_s_rounds"]) == 1
        if row["setting"] != "bare loop (hf-generate model)":
            assert 0 < row["tokens"] <= 24 * row["batch"]
    assert report["comparison"]["4"]["adaptive"]["requests_per_s"] == levels[1]["requests_per_s"]

    micro = report["micro"]
    assert micro["recompiled_after_warmup"] is False
    assert micro["total_ms_per_object_batch1"] > 0
    assert report["targets"]["no_recompilation"]["met"] is True


def test_adapter_share_sends_that_fraction_of_the_mixed_load_to_the_adapters():
    from benchmark import adapter_mix

    assert adapter_mix(6, "base", ["a", "b"], None) == ["base", "a", "b", "base", "a", "b"]
    half = adapter_mix(8, "base", ["a", "b", "c"], 0.5)
    assert half == ["base", "a", "base", "b", "base", "c", "base", "a"]
    assert adapter_mix(10, "base", ["a"], 0.3).count("a") == 3


def test_batch_histograms_of_metrics_with_different_bounds_never_go_negative():
    """The adaptive batcher's histogram has no 64 bound, the step-level one has: each is differenced within
    its own bounds (both summed by `le` gave "33-64": -16 on the GPU host)."""
    from benchmark import batch_histogram, summarize_metrics

    adaptive = {"1.0": 16, "2.0": 16, "4.0": 17, "8.0": 17, "16.0": 18, "32.0": 18, "+Inf": 18}
    steps = {"1.0": 0, "2.0": 0, "4.0": 0, "8.0": 0, "16.0": 0, "32.0": 0, "64.0": 0, "+Inf": 0}
    buckets = {**{("bentoml_service_adaptive_batch_size", le): v for le, v in adaptive.items()},
               **{("seg_engine_step_rows", le): v for le, v in steps.items()}}
    histogram = batch_histogram(buckets)
    assert histogram == {"1": 16, "2": 0, "3-4": 1, "5-8": 0, "9-16": 1, "17-32": 0, ">32": 0}
    both = {**buckets, ("seg_engine_step_rows", "64.0"): 3, ("seg_engine_step_rows", "+Inf"): 3,
            ("seg_engine_step_rows", "32.0"): 1}
    histogram = batch_histogram(both)
    assert min(histogram.values()) >= 0 and sum(histogram.values()) == 21
    assert histogram["33-64"] == 2 and histogram["17-32"] == 1
    summary = summarize_metrics({"batch_buckets": buckets, "batch_sum": 40.0, "batch_count": 18.0, "stages": {},
                                 "seg_engine_time_to_first_step_seconds_sum": 1.5,
                                 "seg_engine_time_to_first_step_seconds_count": 3.0, "seg_engine_steps:graph": 90.0,
                                 "seg_engine_steps:fixed": 0.0})
    assert summary["batches"] == sum(summary["batch_size_histogram"].values()) == 18
    assert summary["time_to_first_step_s_mean"] == 0.5 and summary["steps_by_path"] == {"graph": 90}


def test_benchmark_serves_another_commit_beside_this_one(tiny_fixtures, tmp_path):
    """--baseline-ref REF exports the project at REF and serves it with the same settings (here REF is
    HEAD: what matters is that the exported tree serves and both get the same load)."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--start", "--size", "tiny",
         "--fixtures", str(tiny_fixtures), "--cache-dir", str(tmp_path / "cache"), "--baseline-ref", "HEAD",
         "--requests", "4", "--warmup", "1", "--concurrency", "2", "--max-new-tokens", "16",
         "--out", str(out), "--plot", str(tmp_path / "bench.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    assert report["settings"]["baseline_commit"] == commit
    assert (tmp_path / "cache" / f"source-{commit}" / "service.py").is_file()
    baseline = report["configs"]["main@HEAD"]
    assert baseline["source"] == f"git commit {commit}"
    for name in ("adaptive", "main@HEAD"):
        [level] = report["configs"][name]["levels"]
        assert level["requests"] == level["ok"] == 4 and level["errors"] == {}
    row = report["comparison"]["2"]["adaptive"]
    assert row["x_main@HEAD"] > 0 and row["p50_x_main@HEAD"] > 0


def test_bench_gpu_runs_tiny_on_the_cpu(tiny_fixtures, tmp_path):
    """scripts/bench_gpu.py end to end at the tiny size on the CPU (the GPU run is make bench-gpu)."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tiny-cpu").symlink_to(tiny_fixtures)
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--size", "tiny", "--device", "cpu",
         "--batches", "1,2", "--clients", "1,2", "--requests", "4", "--tokens", "24",
         "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["raw"]["rows"]
    engines = ("graph", "fast", "hf-generate")
    assert {(r["engine"], r["batch"]) for r in rows} == {(e, b) for e in engines for b in (1, 2)}
    for row in rows:
        assert 0 < row["tokens"] <= 24 * row["batch"] and row["tokens_per_s"] > 0
    tokens = {(r["engine"], r["batch"]): r["tokens"] for r in rows}
    assert all(tokens[("graph", b)] == tokens[("fast", b)] == tokens[("hf-generate", b)] for b in (1, 2))
    assert set(report["fast_over_hf_generate_tokens_per_s"]) == set(report["graph_over_hf_generate_tokens_per_s"])
    graph = report["raw"]["graph"]
    assert graph["graphs"] == 0 and graph["buckets"] == [1, 2] and graph["reserved_mib"] > 0  # no CUDA: no graphs
    floor = report["raw"]["floor"]
    assert [f["batch"] for f in floor] == [1, 2] and all(f["step_ms"] > 0 for f in floor)
    assert set(report["service"]) == {"fast, adaptive batches", "graph, step-level batching"}
    for config in report["service"].values():
        levels = config["levels"]
        assert [level["concurrency"] for level in levels] == [1, 2]
        for level in levels:
            assert level["requests"] == level["ok"] == 4 and level["errors"] == {}


def test_original_service_sees_our_fixture_as_a_hub_cache_entry(tiny_fixtures, tmp_path):
    """The layout --seed-dir hands the original service loads by model id from its cache, offline."""
    from seed_service import lay_out_models
    from transformers import PaliGemmaForConditionalGeneration

    model_id = lay_out_models(tiny_fixtures, tmp_path / "models", 224)
    assert model_id.endswith("-224")  # the service reads the image size from the id
    assert (tmp_path / "models" / "vae-oid.npz").is_file()
    model = PaliGemmaForConditionalGeneration.from_pretrained(
        model_id, cache_dir=tmp_path / "models" / "huggingface", local_files_only=True)
    assert model.config.vision_config.image_size == 224
    config = json.loads(next((tmp_path / "models" / "huggingface").glob("*/snapshots/*/tokenizer_config.json"))
                        .read_text())
    assert config["extra_special_tokens"] == {"image_token": "<image>"}


def test_prefill_benchmark_measures_each_kernel_beside_another_commit(tiny_fixtures, tmp_path):
    """scripts/bench_prefill.py: a worker per configuration (the commit's tree, this tree's kernels), each
    importing the tree it measures; ms per image per batch, and the ratio to the commit's."""
    out = tmp_path / "prefill.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_prefill.py"), "--fixtures", str(tiny_fixtures),
         "--cache-dir", str(tmp_path / "cache"), "--ref", "HEAD", "--kernels", "eager,flex", "--batches", "1,2",
         "--rounds", "1", "--repeats", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    assert list(report["summary"]) == [f"main@{commit}", "eager", "flex"]
    for batches in report["summary"].values():
        assert set(batches) == {"1", "2"} and all(b["ms_per_image"] > 0 and b["x_main"] > 0 for b in batches.values())
    samples = report["samples"]
    assert samples[f"main@{commit}"][0]["package"] == str(tmp_path / "cache" / f"source-{commit}" / "segmentation")
    assert samples["eager"][0]["package"] == str(ROOT / "segmentation")
    assert samples["eager"][0]["prefill"]["attention"] == "eager"
    assert samples["flex"][0]["prefill"]["attention"] == "flex"
