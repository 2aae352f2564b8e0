"""scripts/bench_invariance.py end to end on the CPU (Triton's interpreter, the 56 px micro model):
it runs both modes, measures invariance and cost, and writes a complete report. The GPU run is for a
GPU host (docs/batch-invariance.md); no timing or equality figures are asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # about 90 s under the interpreter: make test-slow (and .ci/run) runs it
def test_bench_invariance_smoke_run_on_the_cpu(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "invariance.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_invariance.py"), "--device", "cpu", "--size", "micro",
         "--rows", "2", "--tokens", "5", "--task", "detect", "--batches", "1", "--dtypes", "float32",
         "--cache-dir", str(tmp_path), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["interpreter"] is True and report["device"] == "cpu"
    assert [(r["dtype"], r["mode"]) for r in report["results"]] == [("float32", "off"), ("float32", "on")]
    for result in report["results"]:
        for name in ("invariance_mixed", "invariance_uniform"):
            figures = result[name]
            assert figures["rows"] == 2 and 0 <= figures["rows_bit_equal"] <= figures["rows_equal"] <= 2
            assert len(figures["first_divergence"]) == 2 and figures["tokens"] > 0
        assert [c["batch"] for c in result["cost"]] == [1] and result["cost"][0]["step_ms"] > 0
    assert "bit for bit" in report["results"][1]["describe"]
    # The mode on: same-shape rows must be bit-equal (the property the mode exists for).
    assert report["results"][1]["invariance_uniform"]["rows_bit_equal"] == 2
    assert report["overhead"][0]["dtype"] == "float32" and report["overhead"][0]["step_ratio"] > 0


def test_bench_invariance_help():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_invariance.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--size" in done.stdout and "SEG_BATCH_INVARIANT" in done.stdout
