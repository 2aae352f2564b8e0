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
