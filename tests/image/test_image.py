"""The OCI image as users receive it (`make image-test`): built by `make image` from the bento with its
models baked in, started with its own entrypoint (buildah, chroot isolation, host network, on
127.0.0.1), it gets ready, answers `/segment` on an upload, runs as the non-root `bentoml` user, and
serves the model files baked into it, byte for byte the ones in the model store the bento was built from.

Slow (a container start): excluded from `make test`, run by `make image-test` with the image named by
LOCAL_IMAGE (default localhost/paligemma-segmentation:local-cpu).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from image.smoke import HEIGHT, WIDTH, segment_once
from servers import ROOT, free_port, kill_tree

pytestmark = pytest.mark.image

IMAGE = os.environ.get("LOCAL_IMAGE", "localhost/paligemma-segmentation:local-cpu")
IMAGE_UID = 1034  # the generated Dockerfile's `bentoml` user; the deployment files assume it
READY_TIMEOUT_S = 600


def buildah(*args: str) -> str:
    assert shutil.which("buildah"), "buildah is not installed: run `make image` (it installs it)"
    result = subprocess.run(["buildah", "--storage-driver", "vfs", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"buildah {' '.join(args)}:\n{result.stderr}"
    return result.stdout


@dataclass
class Container:
    name: str
    url: str
    process: subprocess.Popen
    config: dict
    root: Path
    ready_seconds: float
    log: Path

    def env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.config["Env"])


@contextlib.contextmanager
def running(tmp_path_factory, label: str, arguments: list[str] | None = None, env: dict[str, str] | None = None):
    """The image started with its own entrypoint (and its own command unless `arguments` replace it),
    listening on 127.0.0.1 only; yielded once its /readyz answers 200."""
    inspected = json.loads(buildah("inspect", "--type", "image", IMAGE))
    config = inspected["OCIv1"]["config"]
    name = buildah("from", "--pull=never", "--name", f"image-test-{label}-{os.getpid()}", IMAGE).strip()
    port = free_port()
    log = tmp_path_factory.mktemp("container") / "server.log"
    # BentoML's serve reads its address from the environment, so the container listens on 127.0.0.1 only
    # (chroot isolation shares the host's network).
    if arguments is None:
        given = config.get("Cmd") or []
    else:
        given = [a.replace("{port}", str(port)) for a in arguments]
    command = [*(config.get("Entrypoint") or []), *given]
    settings = {"BENTOML_HOST": "127.0.0.1", "BENTOML_PORT": str(port), **(env or {})}
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["buildah", "--storage-driver", "vfs", "run", "--isolation", "chroot",
             *[f"--env={key}={value}" for key, value in settings.items()], name, "--", *command],
            stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert process.poll() is None, f"the container exited with {process.returncode}:\n{log.read_text()[-5000:]}"
            assert time.monotonic() - started < READY_TIMEOUT_S, f"not ready in {READY_TIMEOUT_S}s:\n" + log.read_text()
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        ready = time.monotonic() - started
        print(f"\n{IMAGE} ({label}): /readyz answered 200 {ready:.1f} s after `buildah run`")
        root = Path(buildah("mount", name).strip())
        yield Container(name, url, process, config, root, ready, log)
    finally:
        kill_tree(process.pid)  # the server's workers too: BentoML starts them in groups of their own
        buildah("rm", name)


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    with running(tmp_path_factory, "server") as started:
        yield started


ENGINE_TOKEN = "image-test-engine-token"


@pytest.fixture(scope="module")
def engine_container(tmp_path_factory):
    """The engine tier as deploy/kubernetes/overlays/scale-out and docker-compose.yml start it."""
    arguments = ["start-http-server", "--service-name", "paligemma-engine", "--host", "127.0.0.1",
                 "--port", "{port}"]
    with running(tmp_path_factory, "engine", arguments, {"SEG_ENGINE_TOKEN": ENGINE_TOKEN}) as started:
        yield started


def test_image_is_labelled_with_its_bento_and_cuda_version(container):
    labels = container.config["Labels"]
    assert labels["ai.bentoml.bento"].startswith("paligemma-segmentation:")
    expected_cuda = "none" if labels["paligemma-segmentation.variant"] == "cpu" else "13.0"
    assert labels["paligemma-segmentation.cuda"] == expected_cuda


def test_segment_answers_an_upload_with_the_baked_model(container):
    body = segment_once(container.url, timeout_s=120)
    assert body["model"] == container.env()["SEG_MODELS"].split(",")[0]
    assert body["prompt"] == "segment cat ; dog"
    for obj in body["objects"]:
        x0, y0, x1, y1 = obj["box"]
        assert 0 <= x0 < x1 <= WIDTH and 0 <= y0 < y1 <= HEIGHT


def test_the_release_workflows_start_check_passes(container):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "image" / "smoke.py"), container.url,
                             "--timeout", "60"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ready after" in result.stdout


def test_the_server_runs_as_the_images_non_root_user(container):
    assert container.config["User"] == "bentoml"
    servers = [p for p in psutil.Process(container.process.pid).children(recursive=True)
               if "bentoml" in " ".join(p.cmdline())]
    assert servers, "no server process found under `buildah run`"
    assert {p.uids().effective for p in servers} == {IMAGE_UID}


def digests(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `directory`."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_the_container_serves_the_models_baked_into_it(container):
    """The image holds the model store's files of the bento's models, and is set to load them from there."""
    import bentoml

    from segmentation.serving.settings import model_tag

    env = container.env()
    assert env["SEG_MODEL_SOURCE"] == "store"
    bento = bentoml.bentos.get(container.config["Labels"]["ai.bentoml.bento"])  # the store `make image` used
    baked = container.root / env["BENTO_PATH"].lstrip("/") / "models"
    assert {info.tag.name for info in bento.info.all_models} == {
        env["SEG_VAE_TAG"], *(model_tag(m) for m in env["SEG_MODELS"].split(","))}
    for info in bento.info.all_models:
        stored = Path(bentoml.models.get(info.tag).path)
        inside = baked / info.tag.name / info.tag.version
        assert inside.is_dir(), f"{info.tag} is not in the image"
        assert digests(inside) == digests(stored), f"{info.tag}: the image's files differ from the model store's"
    hub_cache = container.root / env["HF_HOME"].lstrip("/")
    assert not hub_cache.exists() or not any(hub_cache.rglob("*.safetensors")), "weights were downloaded"


class Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_engine_started_as_deployed_runs_no_pickle_and_needs_its_token(engine_container):
    import pickle

    from segmentation.serving.trust import WIRE_VERSION

    marker = "/tmp/pickle-ran"
    for headers in ({}, {"authorization": f"Bearer {ENGINE_TOKEN}"}):
        response = httpx.post(engine_container.url + "/predict", content=pickle.dumps(Exploit(marker)), timeout=30,
                              headers={"content-type": "application/vnd.bentoml+pickle", **headers})
        assert response.status_code == (415 if headers else 401), response.text
    time.sleep(1)
    assert not (engine_container.root / marker.lstrip("/")).exists()
    versioned = {"x-seg-wire-version": WIRE_VERSION}
    assert httpx.post(engine_container.url + "/describe", json={}, headers=versioned, timeout=30).status_code == 401
    described = httpx.post(engine_container.url + "/describe", json={}, timeout=30,
                           headers={**versioned, "authorization": f"Bearer {ENGINE_TOKEN}"})
    served = engine_container.env()["SEG_MODELS"].split(",")[0]
    assert described.status_code == 200 and described.json()[0]["id"] == served
