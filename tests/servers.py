"""Starting and stopping a real `bentoml serve` on 127.0.0.1 for tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = "demo/paligemma2-tiny-random"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int) -> None:
    """BentoML workers live in process groups of their own: kill every descendant."""
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = parent.children(recursive=True) + [parent]
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        proc.kill()


@dataclass
class Server:
    url: str
    home: Path
    process: subprocess.Popen
    log: Path

    def logs(self, tail: int | None = 5000) -> str:
        """The server's log: its last `tail` characters, or all of it."""
        text = self.log.read_text(errors="replace")
        return text if tail is None else text[-tail:]


def import_fixtures(home: Path, fixtures: Path, model_id: str = DEMO_MODEL) -> None:
    env = {**os.environ, "BENTOML_HOME": str(home)}
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "import_models.py"), "--local", str(fixtures / "paligemma"),
         "--as", model_id, "--vae-file", str(fixtures / "vae-oid.npz")],
        env=env, check=True, capture_output=True,
    )


class PortTaken(RuntimeError):
    """The server exited at start because a port it picked was taken meanwhile."""


# How deploy/ (Kubernetes, docker-compose.yml) starts the engine tier: the bento's second service by name,
# through the command the image's entrypoint runs for `start-http-server` (not the bento's entry service,
# so BentoML's own refusal of pickle bodies does not apply to it).
def engine_as_deployed(port: int) -> list[str]:
    return ["-m", "bentoml_cli._internal.start", "start-http-server", "--service-name", "paligemma-engine",
            "--host", "127.0.0.1", "--port", str(port), "."]


def start_server(home: Path, extra_env: dict[str, str] | None = None, target: str = "service:Segmentation",
                 ready_timeout: float = 180, port: int | None = None, cwd: Path = ROOT,
                 command=None, wrapper: Sequence[str] = ()) -> Server:
    """`bentoml serve target` on 127.0.0.1, returned once /readyz answers 200. `command(port)`: the
    arguments after `python` instead (e.g. `engine_as_deployed`). `wrapper` is a command that runs the
    server (its arguments follow it), e.g. one that starts it in a namespace of its own.

    BentoML picks free ports for its own sockets (circus's control socket among them) and binds them
    later; another process can take one in between, and the server exits with "Address already in
    use". Such a start is tried again (three tries), as is one whose own port (free_port) was taken.
    """
    for attempt in range(3):
        try:
            return _start_server_once(home, extra_env, target, ready_timeout, port, cwd, command, wrapper)
        except PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_server_once(home: Path, extra_env: dict[str, str] | None, target: str, ready_timeout: float,
                       port: int | None, cwd: Path, command, wrapper: Sequence[str]) -> Server:
    server = spawn_server(home, extra_env, target, port, cwd, command, wrapper)
    process = server.process
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            logs = server.logs()
            failure = PortTaken if "Address already in use" in logs else RuntimeError
            raise failure(f"server exited with {process.returncode}:\n{logs}")
        try:
            # Short timeouts: /readyz can hang while the engine is still loading.
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    kill_tree(process.pid)
    raise RuntimeError(f"server not ready after {ready_timeout}s:\n{server.logs()}")


def spawn_server(home: Path, extra_env: dict[str, str] | None = None, target: str = "service:Segmentation",
                 port: int | None = None, cwd: Path = ROOT, command=None, wrapper: Sequence[str] = ()) -> Server:
    """Start a server as `start_server` does, without waiting for it (for servers that never get ready)."""
    port = port or free_port()
    name = f"server-{port}-{time.monotonic_ns()}"
    log = home / f"{name}.log"
    # Each server gets a BENTOML_HOME of its own that shares `home`'s model and bento stores: servers
    # sharing one home share its Prometheus directory and garble each other's metrics.
    own_home = home / name
    own_home.mkdir()
    for store in ("models", "bentos"):
        (home / store).mkdir(exist_ok=True)
        (own_home / store).symlink_to(home / store, target_is_directory=True)
    env = {
        **os.environ,
        "BENTOML_HOME": str(own_home),
        "SEG_MODELS": DEMO_MODEL,
        "SEG_MAX_LATENCY_MS": "60000",
        **(extra_env or {}),
    }
    with log.open("wb") as out:
        arguments = command(port) if command else ["-m", "bentoml", "serve", target, "--host", "127.0.0.1",
                                                    "--port", str(port)]
        process = subprocess.Popen([*wrapper, sys.executable, *arguments], cwd=cwd, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    return Server(f"http://127.0.0.1:{port}", home, process, log)
