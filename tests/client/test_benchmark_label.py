"""scripts/benchmark.py --label against a real tiny-model server: it runs and reports the labelling
figures (no timing assertions: the figures depend on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_label_reports_its_figures(tiny_fixtures, tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--start", "--size", "tiny",
         "--fixtures", str(tiny_fixtures), "--requests", "6", "--warmup", "0", "--concurrency", "2",
         "--max-new-tokens", "24", "--label", "--out", str(out), "--plot", str(tmp_path / "bench.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    label = json.loads(out.read_text())["label"]
    assert label["images"] == 6 and label["label_failed"] == 0
    assert set(label["service_images_per_s"]) == {"16", "32", "64"}
    assert label["label_images_per_s"] > 0 and label["sequential_images_per_s"] > 0
    ratio = label["label_images_per_s"] / label["service_best_images_per_s"]
    assert label["fraction_of_service"] == pytest.approx(ratio, rel=0.01)
    assert len(label["rounds"]) == 1 and label["rounds"][0]["fraction_of_service"] == label["fraction_of_service"]
    assert "label_fraction" in json.loads(out.read_text())["targets"]
