"""A missing or corrupt model file stops `bentoml serve` at once, naming the file and the cause."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from servers import DEMO_MODEL, ROOT, import_fixtures


def corrupt(path: Path, data: bytes = b"not a checkpoint") -> None:
    path.chmod(0o644)
    path.write_bytes(data)


def only(pattern: str, home: Path) -> Path:
    [path] = home.glob(pattern)
    return path


@pytest.mark.parametrize(
    ("damage", "models", "expected"),
    [
        (lambda home: corrupt(only("models/vae-oid/*/vae-oid.npz", home)), DEMO_MODEL,
         ["vae-oid.npz", "not a readable npz checkpoint"]),
        (lambda home: only("models/vae-oid/*/vae-oid.npz", home).unlink(), DEMO_MODEL,
         ["vae-oid.npz", "not found"]),
        (lambda home: corrupt(only("models/paligemma2-tiny-random/*/model.safetensors", home)), DEMO_MODEL,
         ["model.safetensors", "unreadable weights"]),
        (lambda home: None, "google/paligemma2-10b-mix-448",
         ["paligemma2-10b-mix-448", "not in the BentoML model store", "import_models.py"]),
    ],
)
def test_bad_model_files_stop_the_server_with_a_clear_message(tmp_path, tiny_fixtures, damage, models, expected):
    home = tmp_path / "home"
    import_fixtures(home, tiny_fixtures)
    damage(home)
    env = {**os.environ, "BENTOML_HOME": str(home), "SEG_MODELS": models}
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "service:Segmentation", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    for fragment in expected:
        assert fragment in output, output[-3000:]


def test_graphs_that_cannot_be_captured_stop_the_server_once_with_the_reason(tmp_path, tiny_fixtures):
    """SEG_REQUIRE_GRAPHS=true on a CPU: the capture fails (torch has no CUDA graphs here), the engine's start
    fails, and `bentoml serve` exits non-zero naming the reason, after one start: BentoML would respawn the
    engine worker for ever (segmentation/serving/lifecycle.py)."""
    home = tmp_path / "home"
    import_fixtures(home, tiny_fixtures)
    env = {**os.environ, "BENTOML_HOME": str(home), "SEG_MODELS": DEMO_MODEL, "SEG_REQUIRE_GRAPHS": "true",
           "SEG_GRAPH_BUCKETS": "1,2"}
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "service:Segmentation", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "the server stopped: the model engine could not start: GraphCaptureError" in output, output[-3000:]
    assert "CUDA graphs are required (SEG_REQUIRE_GRAPHS)" in output and "bucket 2: " in output
    assert "GraphCaptureError" in output.split("model engine failed to start")[1]  # its traceback, logged
    stops = [line for line in output.splitlines() if "FATAL: stopping the server" in line]
    assert len(stops) == 1, stops  # one start, no respawn loop
