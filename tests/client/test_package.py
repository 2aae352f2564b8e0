"""The installable package: its extras agree with the requirements files; a fresh virtual environment
on another Python with only the `client` extra runs the README's client examples against the real
server, and holds no torch, JAX or BentoML; `make install` is the runtime plus the project installed
editable, which imports from any folder."""

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


def make_dry_run(target: str, tmp_path: Path) -> str:
    """The commands `make TARGET` would run on a machine with no virtual environment yet."""
    done = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}", f"BENTOML_HOME={tmp_path / 'home'}",
                           f"FIXTURES={tmp_path / 'fixtures'}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_demo_installs_the_runtime_and_make_test_the_toolchain(tmp_path):
    for target in ("install", "demo", "serve", "build"):
        commands = make_dry_run(target, tmp_path)
        assert "pip install --quiet -r requirements.txt" in commands, target
        assert "pip install --quiet --no-deps -e ." in commands, target  # the project itself, editable
        assert "requirements-dev.txt" not in commands and "npm" not in commands, target
    for target in ("test", "test-slow", "lint"):
        commands = make_dry_run(target, tmp_path)
        assert "-r requirements.txt" in commands and "pip install --quiet -r requirements-dev.txt" in commands
    # What the server needs never pulls the test tools in: none of them is in the runtime list.
    runtime = {re.split(r"[=<>!~\[]", line)[0].lower() for line in requirement_lines(ROOT / "requirements.txt")}
    assert not runtime & {"triton", "playwright", "kubernetes-validate", "schemathesis", "ruff", "pytest",
                          "check-jsonschema", "matplotlib", "supervision"}


def readme_blocks() -> dict[str, str]:
    """The README's tested examples by language: the Python client and the labelling command."""
    blocks = dict(TESTED_BLOCK.findall((ROOT / "README.md").read_text()))
    assert set(blocks) == {"python", "bash"}, blocks.keys()
    return blocks


def package_copy(source: Path) -> Path:
    """What the package builds from, copied (so a build leaves nothing in the working tree)."""
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "segmentation", source / "segmentation", ignore=shutil.ignore_patterns("__pycache__"))
    return source


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment on Python 3.12 with `pip install ".[client]"` of a copy of the
    package (so the build leaves nothing in the working tree)."""
    work = tmp_path_factory.mktemp("client-venv")
    source = package_copy(work / "source")
    venv = work / "venv"
    env = {**os.environ, "PYENV_VERSION": OTHER_PYTHON}
    subprocess.run(["python3.12", "-m", "venv", str(venv)], env=env, check=True)
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"{source}[client]"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return venv


def test_the_client_extra_installs_no_model_libraries(client_venv):
    """Installed, not merely not imported: none of the server's heavy packages is in the environment."""
    code = ("import importlib.util as u; print([m for m in ('torch', 'jax', 'jaxlib', 'bentoml', 'transformers', "
            "'triton', 'cv2') if u.find_spec(m)])")
    done = subprocess.run([str(client_venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def purelib(python: str) -> str:
    """The site-packages folder of the environment of `python`."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_editable_install_imports_from_any_folder(client_venv, server, tmp_path):
    """`pip install --no-deps -e .` (what `make install` runs after the runtime packages) into a fresh
    environment: a script in an unrelated folder imports `segmentation.client` from the source folder and
    talks to the server, and a module added to the source later imports without reinstalling. The
    environment borrows the client extra's packages from `client_venv` (through a .pth file naming a folder
    of links to them, less the copy of `segmentation` installed there), so only the project itself is
    installed here."""
    source = package_copy(tmp_path / "source")
    venv = tmp_path / "venv"
    env = {**os.environ, "PYENV_VERSION": OTHER_PYTHON}
    subprocess.run(["python3.12", "-m", "venv", "--without-pip", str(venv)], env=env, check=True)
    python = str(venv / "bin" / "python")
    packages = tmp_path / "client-packages"
    packages.mkdir()
    for entry in Path(purelib(str(client_venv / "bin" / "python"))).iterdir():
        if not entry.name.startswith(("segmentation", "paligemma_segmentation", "__editable__")):
            (packages / entry.name).symlink_to(entry)
    (Path(purelib(python)) / "client-packages.pth").write_text(f"{packages}\n")
    done = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(source)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(ROOT / "docs" / "example.png", elsewhere / "example.png")
    script = (
        "import segmentation.client as c\n"
        "print(c.__file__)\n"
        f"with c.RemoteSegmenter({server.url!r}) as s:\n"
        "    [r] = s.segment('example.png', 'cat')\n"
        "print('answered', r.width, r.height)\n"
    )
    done = subprocess.run([python, "-c", script], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    first, answered = done.stdout.strip().splitlines()
    assert first == str(source / "segmentation" / "client.py") and answered == "answered 640 480"

    (source / "segmentation" / "editable_probe.py").write_text("VALUE = 42\n")
    done = subprocess.run([python, "-c", "from segmentation.editable_probe import VALUE; print(VALUE)"], cwd=elsewhere,
                          capture_output=True, text=True)
    assert done.stdout.strip() == "42", done.stderr


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
