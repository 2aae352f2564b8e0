"""LoRA adapters end to end: imported with scripts/import_models.py, served by a real `bentoml serve` with
SEG_ADAPTERS, listed by /models, chosen per request, batched with their base; bad adapters stop the server."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from answers import same_answer
from lora import ADAPTERS, FINETUNED, SERVED_ADAPTERS, import_adapter, run_import
from PIL import Image
from servers import DEMO_MODEL, ROOT, import_fixtures
from test_engine_paths import steps
from test_load import post_all, step_rows


def image_b64(seed: int, width: int = 200, height: int = 150) -> str:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_import_stores_the_adapter_under_its_tag_with_its_base(adapter_home):
    [info] = adapter_home.glob("models/lora-lora-a/*/model.yaml")
    model = yaml.safe_load(info.read_text())
    assert model["metadata"]["base_model"] == DEMO_MODEL and model["metadata"]["adapter_id"] == "acme/lora-a"
    assert model["labels"]["kind"] == "lora-adapter"
    assert sorted(p.name for p in info.parent.iterdir() if p.name != "model.yaml") == [
        "adapter_config.json", "adapter_model.safetensors"]


def adapter_of_another_base(tmp: Path, lora: Path) -> Path:
    """The adapter with its tensors moved to a layer the tiny base does not have."""
    from safetensors.torch import load_file, save_file

    dest = tmp / "other-adapter"
    shutil.copytree(lora, dest)
    tensors = load_file(dest / "adapter_model.safetensors")
    save_file({k.replace("layers.1.", "layers.9."): v for k, v in tensors.items()}, dest / "adapter_model.safetensors")
    return dest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "DOCS", "--base", DEMO_MODEL, "--as", "x/y"], "not a PEFT adapter"),
        (["--adapter", "LORA", "--base", "acme/unknown-base", "--as", "x/y"], "not in the model store"),
        (["--adapter", "OTHER", "--base", DEMO_MODEL, "--as", "x/y"], "has no module"),
        (["--adapter", "LORA", "--as", "x/y"], "--base"),
        (["--adapter", "LORA", "--base", DEMO_MODEL], "--as"),
    ],
)
def test_import_refuses_what_is_not_an_adapter_of_the_base(adapter_home, lora_adapters, tmp_path, args, message):
    paths = {"DOCS": ROOT / "docs", "LORA": lora_adapters["a"],
             "OTHER": adapter_of_another_base(tmp_path, lora_adapters["a"])}
    home = tmp_path / "home"
    shutil.copytree(adapter_home / "models", home / "models", symlinks=True)
    result = run_import(home, *[paths.get(a, a) for a in args])
    assert result.returncode != 0 and message in result.stdout + result.stderr, result.stdout + result.stderr
    assert not list(home.glob("models/lora-y/*"))


def test_models_lists_the_adapters_with_their_base(adapter_server):
    models = httpx.post(adapter_server.url + "/models", json={}, timeout=60).json()["models"]
    assert [m["id"] for m in models] == [DEMO_MODEL, *SERVED_ADAPTERS]
    assert all(m["base"] == DEMO_MODEL and not m["default"] for m in models[1:])
    assert "base" not in models[0] and models[0]["default"]
    # Every adapter has a slot in the base's stacked adapter weights: its rows run the base's decode steps.
    assert [m["graphs"]["lora"]["slot"] for m in models[1:]] == [1, 2, 3]
    assert all("PEFT" not in m["graphs"].get("why", "") for m in models[1:])
    prefill = models[0]["graphs"]["prefill"]  # the prefill kernel, chosen at start: on this CPU the eager one
    assert prefill["attention"] == "eager" and "cpu" in prefill["why"] and prefill["vision_attention"] == "sdpa"


def test_mixed_concurrent_requests_equal_their_solo_answers(adapter_server):
    # Every image is sent to the base and to each adapter, all at once: the batcher mixes them.
    bodies = [{"image_base64": image_b64(seed), "prompt": prompt, "model": model}
              for seed, prompt in ((0, "cat"), (1, "dog ; car"), (2, "the man on the left"))
              for model in (DEMO_MODEL, *ADAPTERS)]
    bodies.append({"image_base64": image_b64(0), "prompt": "cat", "model": FINETUNED})
    before = step_rows(httpx.get(adapter_server.url + "/metrics", timeout=30).text)
    paths_before = steps(adapter_server.url)
    together = asyncio.run(post_all(adapter_server.url, bodies, concurrency=len(bodies)))
    after = step_rows(httpx.get(adapter_server.url + "/metrics", timeout=30).text)
    paths_after = steps(adapter_server.url)
    assert [r.status_code for r in together] == [200] * len(bodies), [r.text[:200] for r in together]
    rows, groups = after[0] - before[0], after[1] - before[1]
    assert groups > 0 and rows / groups > 1.5  # the running batch held several requests (and models)
    # Base and adapter rows stepped together in the one fixed-shape step (a CUDA graph on a GPU): not one
    # decode step went through PEFT's hooks.
    stepped = {path: paths_after[path] - paths_before[path] for path in paths_after}
    assert stepped["peft"] == 0 and stepped["fixed"] > 0, stepped
    for body, response in zip(bodies, together):
        assert response.json()["model"] == body["model"]
        alone = httpx.post(adapter_server.url + "/segment", json=body, timeout=120)
        assert same_answer(response.json(), alone.json()), body["model"]
    # The adapters change the answers: the same image and prompt read differently by each.
    for first in range(0, 9, 3):
        texts = {together[first + k].json()["text"] for k in range(3)}
        assert len(texts) == 3


def test_an_unknown_adapter_is_a_400_listing_what_is_served(adapter_server):
    response = httpx.post(adapter_server.url + "/segment", json={
        "image_base64": image_b64(3), "prompt": "cat", "model": "acme/lora-c"}, timeout=60)
    assert response.status_code == 400
    assert f"served models: {DEMO_MODEL}, {', '.join(SERVED_ADAPTERS)}" in response.text


def serve_until_exit(home: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "service:Segmentation", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT, env={**os.environ, "BENTOML_HOME": str(home), "SEG_MODELS": DEMO_MODEL, **env},
        capture_output=True, text=True, timeout=180,
    )


def corrupt_adapter_weights(home: Path) -> None:
    [weights] = home.glob("models/lora-lora-a/*/adapter_model.safetensors")
    weights.chmod(0o644)
    weights.write_bytes(b"not safetensors")


def import_orphan(home: Path, tiny_fixtures: Path, lora: Path) -> None:
    """An adapter of `acme/other-base` (imported, not served)."""
    import_fixtures(home, tiny_fixtures, "acme/other-base")
    import_adapter(home, lora, "acme/lora-a", base="acme/other-base")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda home, fixtures, lora: import_orphan(home, fixtures, lora),
         ["'acme/lora-a'", "'acme/other-base'", "not served"]),
        (lambda home, fixtures, lora: (import_adapter(home, lora, "acme/lora-a"), corrupt_adapter_weights(home)),
         ["adapter_model.safetensors", "unreadable weights"]),
        (lambda home, fixtures, lora: None, ["lora-lora-a", "not in the BentoML model store"]),
    ],
)
def test_bad_adapters_stop_the_server_naming_them(tmp_path, tiny_fixtures, lora_adapters, damage, expected):
    home = tmp_path / "home"
    import_fixtures(home, tiny_fixtures)
    damage(home, tiny_fixtures, lora_adapters["a"])
    result = serve_until_exit(home, {"SEG_ADAPTERS": "acme/lora-a"})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for fragment in expected:
        assert fragment in output, output[-3000:]


def test_make_build_records_the_adapters(adapter_home, tmp_path):
    home = tmp_path / "build-home"
    shutil.copytree(adapter_home / "models", home / "models")
    env = {**os.environ, "BENTOML_HOME": str(home), "SEG_MODELS": DEMO_MODEL, "SEG_ADAPTERS": "acme/lora-a,acme/lora-b"}
    result = subprocess.run(["make", "--no-print-directory", "build"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    name, version = result.stdout.strip().splitlines()[-1].split(":")
    info = yaml.safe_load((home / "bentos" / name / version / "bento.yaml").read_text())
    engine = next(s for s in info["services"] if s["name"] == "paligemma-engine")
    recorded = {m["tag"].split(":")[0] for m in engine["models"]}
    assert recorded == {"paligemma2-tiny-random", "lora-lora-a", "lora-lora-b", "vae-oid"}
    envs = {e["name"]: e["value"] for e in info["envs"]}
    assert envs["SEG_ADAPTERS"] == "acme/lora-a,acme/lora-b" and envs["SEG_MODELS"] == DEMO_MODEL
