"""Getting models in: the import script (local dir, file, URL) and loading from a Hugging Face cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from imageserver import ImageServer
from servers import DEMO_MODEL, ROOT, kill_tree, start_server


def run_import(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "import_models.py"), *args],
                          env={**os.environ, "BENTOML_HOME": str(home)}, capture_output=True, text=True, timeout=300)


def stored(home: Path) -> set[str]:
    return {p.parent.parent.name for p in home.glob("models/*/*/model.yaml")}


def test_import_local_dir_and_vae_from_url(tmp_path, tiny_fixtures):
    home = tmp_path / "home"
    routes = {"/vae-oid.npz": (200, {"Content-Type": "application/octet-stream"},
                               (tiny_fixtures / "vae-oid.npz").read_bytes())}
    with ImageServer(routes) as site:
        result = run_import(home, "--local", str(tiny_fixtures / "paligemma"), "--as", "acme/my-paligemma",
                            "--vae-url", site.url("/vae-oid.npz"))
    assert result.returncode == 0, result.stderr
    assert stored(home) == {"my-paligemma", "vae-oid"}
    [model_dir] = [p for p in home.glob("models/my-paligemma/*") if p.is_dir()]
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    [vae_dir] = [p for p in home.glob("models/vae-oid/*") if p.is_dir()]
    assert (vae_dir / "vae-oid.npz").read_bytes() == (tiny_fixtures / "vae-oid.npz").read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--vae-file", "README.md"], "not a readable npz"), (["--local", "docs", "--as", "x/y"], "no PaliGemma model"),
     (["--local", "docs"], "--as"), ([], "nothing to import")],
)
def test_import_refuses_bad_input(tmp_path, args, message):
    result = run_import(tmp_path / "home", *[str(ROOT / a) if a in ("README.md", "docs") else a for a in args])
    assert result.returncode != 0 and message in result.stdout + result.stderr


def hf_cache(root: Path, model_id: str, source: Path) -> Path:
    """A Hugging Face hub cache holding `source` as `model_id` at revision main (what a download leaves)."""
    repo = root / "hub" / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot.name)
    return root


def test_serve_from_a_mounted_hugging_face_cache(tmp_path, tiny_fixtures):
    home = tmp_path / "home"
    assert run_import(home, "--vae-file", str(tiny_fixtures / "vae-oid.npz")).returncode == 0
    cache = hf_cache(tmp_path / "hf", DEMO_MODEL, tiny_fixtures / "paligemma")
    token_file = tmp_path / "hf_token"
    token_file.write_text("hf_not_a_real_token\n")
    server = start_server(home, {
        "SEG_MODEL_SOURCE": "hub", "HF_HOME": str(cache), "HF_HUB_OFFLINE": "1", "HF_TOKEN_FILE": str(token_file),
    })
    try:
        response = httpx.post(server.url + "/segment", files={"image": (ROOT / "docs" / "example.png").open("rb")},
                              data={"prompt": "cat"}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == DEMO_MODEL
    finally:
        kill_tree(server.process.pid)
