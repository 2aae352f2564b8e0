"""`make build` in a fresh BentoML home: the bento records the models, has a Dockerfile, and serves."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import yaml
from servers import DEMO_MODEL, kill_tree, start_server

ROOT = Path(__file__).resolve().parents[2]


def test_make_build_records_models_and_the_bento_serves(tmp_path, tiny_fixtures):
    home = tmp_path / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home), "FIXTURES": str(tiny_fixtures)}
    env.pop("SEG_MODELS", None)
    result = subprocess.run(["make", "--no-print-directory", "build"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    tag = result.stdout.strip().splitlines()[-1]
    name, version = tag.split(":")
    bento = home / "bentos" / name / version
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    engine = next(s for s in info["services"] if s["name"] == "paligemma-engine")
    recorded = {m["tag"].split(":")[0] for m in engine["models"]}
    assert recorded == {"paligemma2-tiny-random", "vae-oid"}
    envs = {e["name"]: e["value"] for e in info["envs"]}
    assert envs["SEG_MODELS"] == DEMO_MODEL and envs["JAX_PLATFORMS"] == "cpu"
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "EXPOSE 3000" in dockerfile
    assert not (bento / "src" / "tests").exists() and not (bento / "src" / ".fixtures").exists()

    # A local `bentoml serve <bento>` does not apply the bento's envs: pass them as the image would.
    server = start_server(home, {"SEG_MODELS": envs["SEG_MODELS"]}, target=tag)
    try:
        picture = ROOT / "docs" / "example.png"
        response = httpx.post(server.url + "/segment", files={"image": picture.open("rb")}, data={"prompt": "cat"},
                              timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == DEMO_MODEL
    finally:
        kill_tree(server.process.pid)
