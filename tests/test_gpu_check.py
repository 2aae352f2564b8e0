"""scripts/gpu_check.py (make gpu-check): refuses at once without CUDA; on the CPU, its smoke run goes through
every phase but pytest on the tiny model, and a phase past its budget is stopped and reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
PHASES = ["env", "tiny", "kernels", "capture", "speed", "agreement", "prefill", "lora", "invariance", "service",
          "pytest"]


def test_make_gpu_check_refuses_at_once_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    start = time.monotonic()
    done = subprocess.run(["make", "--no-print-directory", "gpu-check", "GPU_RUN=", f"GPU_PYTHON={sys.executable}",
                           f"GPU_CHECK_ARGS=--out {tmp_path / 'gpu.json'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "REFUSED: gpu-check needs a CUDA GPU" in done.stderr and "CUDA" in done.stderr
    assert time.monotonic() - start < 60 and not (tmp_path / "gpu.json").exists()
    # No `install` prerequisite (the GPU host is offline): the one command, with .gpu/run.sh where it exists.
    dry = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "GPU_RUN=bash .gpu/run.sh"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert dry.stdout.split() == ["bash", ".gpu/run.sh", "python3", "scripts/gpu_check.py"], dry.stdout


def run(tmp_path: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu.json"
    # The CPU smoke run: Triton's compiler, not its interpreter (the invariant phases report it unavailable).
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--size", "tiny", "--out", str(out),
                           "--cache-dir", str(tmp_path / "cache"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return done, json.loads(out.read_text())


def test_a_phase_past_its_budget_is_stopped_and_the_rest_skipped(tmp_path):
    """The service phase (a fixture to write, a server to start: far more than 15 s here) is stopped with its
    server at the total budget; pytest, after it, has no time left."""
    import psutil

    start = time.monotonic()
    done, report = run(tmp_path, "--only", "service,pytest", "--budget", "15")
    assert done.returncode == 1 and time.monotonic() - start < 60
    phases = report["phases"]
    assert phases["service"]["status"] == "FAIL" and "over its budget" in phases["service"]["reason"]
    assert phases["pytest"]["status"] == "SKIP" and "no time left" in phases["pytest"]["reason"]
    assert all(phases[name]["status"] == "SKIP" for name in PHASES if name not in ("service", "pytest"))
    lines = done.stdout.splitlines()
    assert any(line.startswith("FAIL  service") for line in lines)
    assert (tmp_path / "gpu.log").read_text().count("FAIL  service") == 2  # as it ended, and in the summary
    # The worker and whatever it started are gone.
    stray = [p for p in psutil.process_iter(["cmdline"]) if "--worker" in (p.info["cmdline"] or [])
             and str(tmp_path) in " ".join(p.info["cmdline"])]
    assert stray == []


def test_cpu_smoke_run_goes_through_every_phase(tmp_path, tiny_fixtures):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tiny-cpu").symlink_to(tiny_fixtures)  # bench_gpu.fixtures' name for it
    done, report = run(tmp_path, "--skip", "pytest")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    phases = report["phases"]
    assert list(phases) == PHASES
    statuses = {name: phases[name]["status"] for name in PHASES}
    assert statuses == {"env": "PASS", "tiny": "PASS", "kernels": "INFO", "capture": "INFO", "speed": "PASS",
                        "agreement": "INFO", "prefill": "INFO", "lora": "PASS", "invariance": "INFO",
                        "service": "PASS", "pytest": "SKIP"}, \
        {n: phases[n]["reason"] for n in PHASES}
    # One line per phase, with its reason, as it ends and again in the summary at the end of the output.
    for name in PHASES:
        found = [line for line in done.stdout.splitlines() if line.split()[1:2] == [name]]
        assert len(found) == 2 and found[0] == found[1], found
        assert found[0].startswith(statuses[name]) and phases[name]["reason"] in found[0]
    assert done.stdout.splitlines()[-len(PHASES) - 2] == "gpu-check summary:"
    tiny = phases["tiny"]
    assert [c["rows"] for c in tiny["cases"]] == [1, 3]  # the smoke run's cases (GPU: 1, 2, 3, 5, 8)
    assert all(c["replay_eq_eager"] == c["rows"] and set(c["steps_eager"]) <= {"fixed"} for c in tiny["cases"])
    assert sum(c["steps_eager"].get("fixed", 0) for c in tiny["cases"]) > 0
    assert tiny["scheduler"]["replay_eq_eager"] == 12 and tiny["scheduler"]["stats"]["admitted"] == 12
    speed = phases["speed"]
    assert set(speed["by_batch"]) == {"1", "2"} and all(v["floor_step_ms"] > 0 for v in speed["by_batch"].values())
    assert {r["engine"] for r in speed["rows"]} == {"graph", "fast", "hf-generate"}
    assert set(phases["agreement"]["rates"]) == {"graph=hf-generate", "graph=fast", "fast=hf-generate"}
    prefill = phases["prefill"]  # both kernels timed on the same model; on a CPU `auto` takes the eager one
    assert prefill["auto"]["kernel"] == "eager" and prefill["kernels"]["flex"]["chosen"] == "flex"
    assert set(prefill["kernels"]["eager"]["by_batch"]) == {"1", "2"} and prefill["kernels"]["flex"]["compile_s"]
    assert prefill["agreement"]["argmax_equal"] == prefill["agreement"]["rows"] == 2  # float32: the same tokens
    lora = phases["lora"]  # base-only and mixed steps, all on the fixed-shape step (a CUDA graph on a GPU)
    assert lora["adapted"]["mixed"]["paths"] == {"fixed": 40} and lora["adapted"]["mixed"]["adapter_rows"] == 1
    assert [s["slot"] for s in lora["adapted"]["slots"].values()] == [1, 2, 3]
    assert lora["mixed_over_plain_base"] > 0 and lora["plain"]["base_only"]["paths"] == {"fixed": 40}
    assert phases["invariance"]["modes"]["off"]["rows"] == 2
    service = phases["service"]
    assert [level["concurrency"] for level in service["levels"]] == [1, 2]
    for level in service["levels"]:
        assert level["errors"] == {} and level["latency_s"]["p90"] is not None
        assert set(level["steps_by_path"]) == {"fixed"} and level["time_to_first_step_s_mean"] is not None
    assert service["models"][0]["graphs"]["captured"] is False
    assert report["failed"] == [] and report["wall_s"] > 0
