"""The release workflow's path for pull requests, minus Docker: tiny fixtures imported under the default
model's id, `make build`, then scripts/bento_context.py writes the build context docker/build-push-action
takes. The context is complete (every COPY source present, the models in it) and agrees with the
Kubernetes and compose files (uid, HF_HOME, port)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def run(args: list[str], env: dict) -> str:
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_build_context_of_the_release_workflow(tmp_path, tiny_fixtures):
    from segmentation.serving.settings import DEFAULT_MODEL, VAE_TAG, model_tag

    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "SEG_MODELS": DEFAULT_MODEL,
           "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("SEG_MODEL_SOURCE", None)
    run([sys.executable, "scripts/import_models.py", "--local", str(tiny_fixtures / "paligemma"),
         "--as", DEFAULT_MODEL, "--vae-file", str(tiny_fixtures / "vae-oid.npz")], env)
    tag = run(["make", "--no-print-directory", "build"], env).strip().splitlines()[-1]
    assert re.fullmatch(r"paligemma-segmentation:\w+", tag), tag

    context = tmp_path / "context"
    dockerfile = Path(run([sys.executable, "scripts/bento_context.py", tag, str(context)], env).strip())
    assert dockerfile == context / "env" / "docker" / "Dockerfile"
    text = dockerfile.read_text()

    # The weights travel in the context: one directory per model with its model.yaml.
    for name, payload in ((model_tag(DEFAULT_MODEL), "config.json"), (VAE_TAG, "vae-oid.npz")):
        [version] = [p for p in (context / "models" / name).iterdir() if p.is_dir()]
        assert (version / "model.yaml").is_file() and (version / payload).is_file()
    assert (context / "bento.yaml").is_file() and (context / "src" / "service.py").is_file()
    assert not (context / "src" / "tests").exists()

    # Every COPY source exists in the context (a Dockerfile/context mismatch fails only in CI).
    for source in re.findall(r"^COPY (?:--\S+ )*(\S+) \S+$", text, re.M):
        assert (context / source).exists(), f"COPY {source}: not in the context"

    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))
    assert args["SEG_MODELS"] == DEFAULT_MODEL
    assert args["SEG_MODEL_SOURCE"] == "store"
    assert args["JAX_PLATFORMS"] == "cpu"
    assert "EXPOSE 3000" in text
    assert re.search(r"^USER bentoml$", text, re.M)

    # The deployment files assume the image's user id and cache path.
    deployment = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "base" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    assert int(args["BENTO_USER_UID"]) == pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"]
    assert int(args["BENTO_USER_GID"]) == pod["securityContext"]["runAsGroup"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert args["HF_HOME"] == env["HF_HOME"]
    # Read-only root: the pod's volumes must not hide the bento (BENTO_PATH, inside the image's own
    # BENTOML_HOME), so the Deployment gives BentoML a home of its own on a volume.
    mounts = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
    assert not [m for m in mounts if (args["BENTO_PATH"] + "/").startswith(m.rstrip("/") + "/")]
    image_home = re.search(r"^ENV BENTOML_HOME=(\S+)$", text, re.M)[1]
    assert args["BENTO_PATH"].startswith(image_home) and env["BENTOML_HOME"] != image_home.rstrip("/")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["hf-cache-owner"]["command"][1] == f"{args['BENTO_USER_UID']}:{args['BENTO_USER_GID']}"
    assert compose["services"]["segmentation"]["environment"]["HF_HOME"] == args["HF_HOME"]
