"""The installable package: its extras agree with the requirements files, and a fresh virtual
environment on another Python with only the `client` extra runs the README's client examples
against the real server, without torch, JAX or BentoML."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
OTHER_PYTHON = "3.12.1"  # the server runs on 3.11
TESTED_BLOCK = re.compile(r"<!-- tested: tests/client/test_package.py [^>]*-->\n```(\w+)\n(.*?)```", re.S)


def requirement_lines(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "-r"))]


def test_extras_match_the_requirements_files():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert sorted(extras["serve"]) == sorted(requirement_lines(ROOT / "requirements.txt"))
    assert sorted(extras["dev"]) == sorted(
        ["paligemma-segmentation[serve]", *requirement_lines(ROOT / "requirements-dev.txt")])
    heavy = ("torch", "jax", "bentoml", "transformers")
    assert not [r for r in extras["client"] + project["dependencies"] if r.startswith(heavy)]


def readme_blocks() -> dict[str, str]:
    """The README's tested examples by language: the Python client and the labelling command."""
    blocks = dict(TESTED_BLOCK.findall((ROOT / "README.md").read_text()))
    assert set(blocks) == {"python", "bash"}, blocks.keys()
    return blocks


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment on Python 3.12 with `pip install ".[client]"` of a copy of the
    package (so the build leaves nothing in the working tree)."""
    work = tmp_path_factory.mktemp("client-venv")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "segmentation", source / "segmentation", ignore=shutil.ignore_patterns("__pycache__"))
    venv = work / "venv"
    env = {**os.environ, "PYENV_VERSION": OTHER_PYTHON}
    subprocess.run(["python3.12", "-m", "venv", str(venv)], env=env, check=True)
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"{source}[client]"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return venv


def test_fresh_client_environment_runs_the_readme_examples(client_venv, server, tmp_path):
    python = str(client_venv / "bin" / "python")
    blocks = readme_blocks()
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "example.png", tmp_path / "docs" / "example.png")
    # The README's Python block, against the test server, then a check of what it imported.
    script = blocks["python"].replace("http://127.0.0.1:3000", server.url) + (
        "import sys, platform\n"
        "print('python', platform.python_version())\n"
        "print('loaded', [m for m in ('torch', 'jax', 'bentoml', 'transformers') if m in sys.modules])\n"
        "assert all(o.mask.dtype == bool and o.mask.shape == (result.height, result.width) for o in result.objects)\n"
    )
    (tmp_path / "example.py").write_text(script)
    done = subprocess.run([python, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"python {OTHER_PYTHON}" in done.stdout and "loaded []" in done.stdout
    # The package came from the environment, not from a source folder next to the script.
    where = subprocess.run([python, "-c", "import segmentation.client as c; print(c.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert str(client_venv) in where

    # The README's labelling command, run by that environment's Python on a small folder.
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (60 + 10 * i, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"p{i}.png")
    command = shlex.split(blocks["bash"].replace("http://127.0.0.1:3000", server.url))
    assert command[:3] == ["python", "-m", "segmentation.label"]
    done = subprocess.run([python, *command[1:], "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    coco = json.loads((tmp_path / "labels" / "coco.json").read_text())
    assert sorted(image["file_name"] for image in coco["images"]) == ["p0.png", "p1.png", "p2.png"]
    assert "labelled 3 images" in done.stdout
