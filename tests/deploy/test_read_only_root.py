"""The Kubernetes pods' read-only root file system (`readOnlyRootFilesystem: true`), shown on a real server.

`bentoml serve service:Segmentation` runs on 127.0.0.1 with the environment the base Deployment sets
(TMPDIR, HOME, BENTOML_HOME, HF_HOME...), each path moved into a directory standing for the pod's volume
that holds it, in a mount namespace where every other mount is read-only (the kernel's /proc, /sys and
/dev aside, as in a container: /dev/shm stays writable there too). The server gets ready and answers
`/segment` (an upload and a JSON body) and `/metrics`; it logged no "Read-only file system"; BentoML's
files went where the Deployment sends them (not to a fallback); the project tree it served from is
untouched.

One difference from a pod: the models come from BENTOML_HOME's model store (a link to the test's
store, read-only like the rest), where the image reads them from the bento itself.

Needs a mount namespace (`unshare`): as root, or with unprivileged user namespaces; skipped otherwise.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import ROOT, kill_tree, start_server
from test_kubernetes import BASE, WRITABLE_ENV, env_of, pod_templates, volume_under, writable_mounts

# Run "$@" with every mount read-only but the directories given before `--` (bound onto themselves
# first). Each mount keeps its other flags (nosuid, nodev...: a user namespace may not clear them).
READ_ONLY_ROOT = r"""
set -euo pipefail
writable=()
while [ "$1" != -- ]; do writable+=("$1"); shift; done
shift
for dir in "${writable[@]}"; do mount --bind "$dir" "$dir"; done
mapfile -t mounts < <(awk '{print $5, $6}' /proc/self/mountinfo)
for entry in "${mounts[@]}"; do
  point=${entry% *} options=${entry##* }
  case $point in /proc | /proc/* | /sys | /sys/* | /dev | /dev/*) continue ;; esac
  for dir in "${writable[@]}"; do [ "$point" = "$dir" ] && continue 2; done
  mount -o "remount,bind,${options/#rw/ro}" "$point"
done
exec "$@"
"""

# Cache locations of this machine's environment that a pod's would not have: they would send writes
# elsewhere than the Deployment's variables do.
HOST_ONLY_ENV = ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR",
                 "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR", "HF_HUB_CACHE", "CUDA_CACHE_PATH",
                 "JAX_COMPILATION_CACHE_DIR", "PYTHONPYCACHEPREFIX", "PROMETHEUS_MULTIPROC_DIR")


def read_only_root(writable: list[Path]) -> list[str]:
    """The command prefix that runs a command under a read-only root with `writable` left writable."""
    user_namespace = [] if os.geteuid() == 0 else ["--map-root-user"]
    return ["unshare", "--mount", *user_namespace, "--", "bash", "-c", READ_ONLY_ROOT, "read-only-root",
            *map(str, writable), "--"]


def snapshot(tree: Path) -> dict[str, tuple[int, int]]:
    """Every path under `tree` with its modification time and size."""
    found = {}
    for directory, _, files in os.walk(tree):
        for name in [".", *files]:
            path = os.path.join(directory, name)
            stat = os.lstat(path)
            found[path] = (stat.st_mtime_ns, stat.st_size)
    return found


def png_bytes() -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def volumes_dir():
    """Where the pod's volumes are stood in for: a short path, as BentoML's Unix sockets live in TMPDIR
    and a socket's path may not exceed 107 bytes (pytest's tmp_path can be longer)."""
    directory = Path(tempfile.mkdtemp(prefix="ro-root-"))
    yield directory
    shutil.rmtree(directory)


def test_the_server_runs_on_a_read_only_root_writing_only_to_the_deployments_volumes(
        server_home, volumes_dir, tmp_path, monkeypatch):
    [template] = pod_templates(BASE).values()
    [container] = template["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Each writable volume of the pod becomes a directory of its own; the variables follow.
    mounts = writable_mounts(template, container)
    stand_in = {path: volumes_dir / volume["name"] for path, volume in mounts.items()}
    for directory in stand_in.values():
        directory.mkdir()

    def moved(path: str) -> str:
        mount = volume_under(path, mounts)
        return str(stand_in[mount] / os.path.relpath(path, mount)) if mount else path

    env = {name: moved(e["value"]) for name, e in env_of(container).items() if "value" in e}
    assert set(WRITABLE_ENV) <= set(env)
    bentoml_home = Path(env["BENTOML_HOME"])
    bentoml_home.mkdir(parents=True)
    (bentoml_home / "models").symlink_to(server_home / "models", target_is_directory=True)
    for name in HOST_ONLY_ENV:
        monkeypatch.delenv(name, raising=False)

    if shutil.which("unshare") is None:
        pytest.skip("no unshare (util-linux) here")
    wrapper = read_only_root(list(stand_in.values()))
    inside, outside = stand_in["/tmp"] / "probe", tmp_path / "probe"
    probe = subprocess.run([*wrapper, "bash", "-c", f"touch {inside} && touch {outside}"], capture_output=True,
                           text=True, timeout=60)
    if not inside.exists():
        pytest.skip(f"cannot make a read-only mount namespace here: {probe.stderr.strip()[-500:]}")
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr and not outside.exists()
    inside.unlink()

    before = snapshot(ROOT)
    srv = start_server(server_home, {**env, "SEG_MAX_BATCH_SIZE": "4"}, wrapper=wrapper)
    try:
        mountinfo = Path(f"/proc/{srv.process.pid}/mountinfo").read_text().splitlines()
        assert any(line.split()[4] == "/" and line.split()[5].startswith("ro") for line in mountinfo)

        upload = httpx.post(srv.url + "/segment", files={"image": ("picture.png", png_bytes(), "image/png")},
                            data={"prompt": "cat ; dog"}, timeout=120)
        assert upload.status_code == 200, upload.text
        body = httpx.post(srv.url + "/segment", json={"image_base64": base64.b64encode(png_bytes()).decode(),
                                                      "prompt": "car"}, timeout=120)
        assert body.status_code == 200, body.text
        assert httpx.get(srv.url + "/metrics", timeout=10).status_code == 200
        # BentoML's Unix sockets (it removes them when it stops).
        assert any(Path(env["TMPDIR"]).glob("bentoml-uds-*")), "BentoML's temporary files went elsewhere"
    finally:
        kill_tree(srv.process.pid)

    logs = srv.log.read_text(errors="replace")
    assert "Read-only file system" not in logs, logs[-5000:]
    assert any((bentoml_home / "prometheus_multiproc_dir").iterdir()), "BentoML's metrics went elsewhere"
    assert snapshot(ROOT) == before, "the server wrote into the project tree"
