"""The suite's own device: the CPU in float32 unless asked (tests/conftest.py), and the `cuda` set collected
and skipped where no GPU is visible."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segmentation.model.engine import PaliGemmaEngine, default_device

ROOT = Path(__file__).resolve().parents[2]


def test_the_suite_runs_on_the_cpu_unless_asked(request, tiny_fixtures):
    if os.environ.get("SEG_TEST_DEVICE", "cpu") == "cuda" or request.config.option.markexpr.strip() == "cuda":
        pytest.skip("this session asked for the GPU")
    # Hidden from this process and every server it starts; the engines' defaults then pick the CPU.
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and os.environ["SEG_DEVICE"] == "cpu"
    assert not torch.cuda.is_available() and default_device() == "cpu"
    engine = PaliGemmaEngine.from_pretrained(tiny_fixtures / "paligemma")
    assert engine.device.type == "cpu" and engine.model.dtype == torch.float32


def test_the_cuda_set_is_collected_and_skipped_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the cuda set runs (pytest -m cuda)")
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/model/test_cuda.py"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and "passed" not in summary and "failed" not in summary, summary
    assert int(summary.split()[0]) >= 10  # every cuda test was collected
