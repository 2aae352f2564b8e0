"""The long first-time steps show progress: the demo VAE's training and a model's copy into the store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_training_bar_follows_the_training_log(monkeypatch, capsys):
    """The bar reads the lines `train()` logs: the real training loop, shrunk (a few small batches)."""
    import train_vae_fixture
    from make_tiny_model import TrainingBar

    monkeypatch.setattr(train_vae_fixture, "TRAIN_SHAPES", 32)
    monkeypatch.setattr(train_vae_fixture, "BATCH", 2)
    bar = TrainingBar(100)
    train_vae_fixture.train(seed=0, steps=100, log=bar)
    bar.close()
    assert bar.bar.n == 100
    err = capsys.readouterr().err
    assert "training the mask VAE" in err and "100/100" in err and "loss" in err


def test_model_import_shows_the_bytes_copied(tmp_path, tiny_fixtures):
    source = tmp_path / "source"
    shutil.copytree(tiny_fixtures / "paligemma", source)
    (source / "README.md").write_text("a model card: not copied\n")
    (source / ".cache").mkdir()
    (source / ".cache" / "download.lock").write_text("hub bookkeeping: not copied\n")
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_models.py"), "--local", str(source),
                           "--as", "acme/progress"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "copying acme/progress into the model store" in done.stderr and "100%" in done.stderr
    [stored] = [p for p in (tmp_path / "home" / "models" / "progress").iterdir() if p.is_dir()]
    copied = {p.relative_to(stored) for p in stored.rglob("*") if p.is_file()} - {Path("model.yaml")}
    expected = {p.relative_to(tiny_fixtures / "paligemma") for p in (tiny_fixtures / "paligemma").rglob("*")
                if p.is_file()}
    assert copied == expected
    for name in copied:
        assert (stored / name).read_bytes() == (source / name).read_bytes()
