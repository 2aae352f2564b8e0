"""docker-compose.yml: valid against the Compose Specification schema (the copy check-jsonschema
vendors) and wired as the service needs it on one GPU host: a released image that must be named,
tokens as secret files (the engine token shared by the scale-out tiers)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
IMAGE_UID = 1034  # the image's user (BentoML's Dockerfile); test_bento_context checks it


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def schema_errors(document: dict) -> list[str]:
    schema = json.loads((resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in validator.iter_errors(document)]


def seconds(duration: str) -> float:
    """A compose duration (`1m30s`, `30m`, `10s`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_file_matches_the_compose_spec():
    errors = schema_errors(compose())
    assert not errors, "\n".join(errors)


def test_compose_schema_rejects_a_misspelled_key():
    broken = copy.deepcopy(compose())
    broken["services"]["segmentation"]["healthchek"] = broken["services"]["segmentation"].pop("healthcheck")
    assert schema_errors(broken)


def test_server_service():
    spec = compose()
    server = spec["services"]["segmentation"]
    assert server["image"] == "${IMAGE:?set IMAGE to a released image, e.g. USER/paligemma-segmentation:1.2.3}"
    assert server["ports"] == ["${PORT:-3000}:3000"]
    assert server["restart"] == "unless-stopped"
    assert server["environment"]["SEG_DEVICE"] == "cuda"
    assert server["environment"]["JAX_PLATFORMS"] == "cpu"
    assert "SEG_MODELS" not in server["environment"], "the image names the models it holds"
    [devices] = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


def test_token_is_a_compose_secret_read_through_hf_token_file():
    spec = compose()
    server = spec["services"]["segmentation"]
    assert server["secrets"] == ["hf_token"]
    assert spec["secrets"]["hf_token"] == {"file": "./secrets/hf_token"}
    assert server["environment"]["HF_TOKEN_FILE"] == "/run/secrets/hf_token"
    assert "HF_TOKEN" not in server["environment"]


def test_model_cache_is_a_named_volume_the_server_user_owns():
    spec = compose()
    server = spec["services"]["segmentation"]
    assert server["environment"]["HF_HOME"] == "/models/hf"
    assert "hf-cache:/models/hf" in server["volumes"]
    assert "hf-cache" in spec["volumes"]
    owner = spec["services"]["hf-cache-owner"]
    assert "hf-cache:/models/hf" in owner["volumes"]
    assert owner["command"] == ["chown", f"{IMAGE_UID}:{IMAGE_UID}", "/models/hf"]
    assert server["depends_on"]["hf-cache-owner"] == {"condition": "service_completed_successfully"}


def test_healthcheck_waits_for_readyz_with_a_short_timeout():
    check = compose()["services"]["segmentation"]["healthcheck"]
    assert check["test"][0] == "CMD"
    assert "http://127.0.0.1:3000/readyz" in " ".join(check["test"])
    assert seconds(check["timeout"]) <= 10
    assert seconds(check["start_period"]) >= 30 * 60, "loading a 10B model can take 10+ minutes"


def test_no_image_defaults_to_a_moving_tag():
    """IMAGE must be set (`${IMAGE:?...}` stops compose with the message); other images name a version."""
    for name, service in compose()["services"].items():
        image = service["image"]
        assert ":-" not in image and "latest" not in image, f"{name}: {image}"
        assert image.startswith("${IMAGE:?") or re.fullmatch(r"[\w./-]+:\d[\w.-]*", image), f"{name}: {image}"


def test_scale_out_tiers_share_the_engine_token_as_a_compose_secret():
    spec = compose()
    assert spec["secrets"]["engine_token"] == {"file": "./secrets/engine_token"}
    for name in ("engine", "public"):
        service = spec["services"][name]
        assert "engine_token" in service["secrets"], name
        assert service["environment"]["SEG_ENGINE_TOKEN_FILE"] == "/run/secrets/engine_token", name
    for name, service in spec["services"].items():
        assert "SEG_ENGINE_TOKEN" not in service.get("environment", {}), f"{name}: the token is a file"
        assert "HF_TOKEN" not in service.get("environment", {}), f"{name}: the token is a file"
    one_server = spec["services"]["segmentation"]
    assert "engine_token" not in one_server["secrets"] and "SEG_ENGINE_TOKEN_FILE" not in one_server["environment"]


@pytest.mark.parametrize("path", ["secrets/hf_token", "secrets/engine_token", "segmentation.env"])
def test_local_secrets_are_git_ignored(path):
    result = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
    assert result.returncode == 0, f"{path} must be git-ignored: it holds tokens"


def test_scale_out_profile_splits_the_engine_from_the_public_tier():
    spec = compose()
    engine, public = spec["services"]["engine"], spec["services"]["public"]
    assert engine["profiles"] == public["profiles"] == ["scale-out"]
    assert "profiles" not in spec["services"]["segmentation"], "one server stays the default"
    assert engine["image"] == public["image"] == spec["services"]["segmentation"]["image"]
    assert engine["command"][:3] == ["start-http-server", "--service-name", "paligemma-engine"]
    assert "--port" in engine["command"] and engine["command"][engine["command"].index("--port") + 1] == "3000"
    [devices] = engine["deploy"]["resources"]["reservations"]["devices"]
    assert devices == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert "deploy" not in public, "the public tier needs no GPU"
    assert public["environment"]["SEG_ENGINE_URL"] == "http://engine:3000"
    assert "SEG_ENGINE_URL" not in engine["environment"]
    assert "/readyz" in " ".join(engine["healthcheck"]["test"])
    assert "/livez" in " ".join(public["healthcheck"]["test"])
    assert seconds(engine["stop_grace_period"]) > float(engine["environment"]["SEG_REQUEST_TIMEOUT_S"])
    assert "ports" not in engine, "only the public tier is published"
