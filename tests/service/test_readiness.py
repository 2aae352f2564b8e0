"""/readyz and /livez answer at once from the moment the API worker runs, never hanging while the engine loads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
from servers import DEMO_MODEL, ROOT, free_port, import_fixtures, kill_tree

CLIENT_TIMEOUT_S = 2.0


def poll(url: str, path: str, until: threading.Event, deadline: float, log: list) -> None:
    while not until.is_set() and time.monotonic() < deadline:
        sent = time.monotonic()
        try:
            response = httpx.get(url + path, timeout=CLIENT_TIMEOUT_S)
            outcome = (response.status_code, response.json())
        except httpx.ConnectError:
            outcome = "refused"  # not listening yet: an immediate answer too
        except httpx.TimeoutException:
            outcome = "timeout"
        log.append((path, sent, time.monotonic() - sent, outcome))
        if path == "/readyz" and isinstance(outcome, tuple) and outcome[0] == 200:
            until.set()
        time.sleep(0.2)


def test_probes_answer_at_once_from_start_to_ready(tmp_path, tiny_fixtures):
    home = tmp_path / "home"
    import_fixtures(home, tiny_fixtures)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "BENTOML_HOME": str(home), "SEG_MODELS": DEMO_MODEL}
    process = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service:Segmentation", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    log: list = []
    ready = threading.Event()
    deadline = time.monotonic() + 240
    try:
        threads = [
            threading.Thread(target=poll, args=(url, path, ready, deadline, log)) for path in ("/readyz", "/livez")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert ready.is_set(), log[-5:]
        answer = httpx.post(url + "/models", json={}, timeout=30)
        assert answer.status_code == 200
    finally:
        kill_tree(process.pid)

    # BentoML's arbiter opens the listening socket before the API worker has booted (about 2 s of
    # imports): a poll sent in that window waits for the worker, and a /readyz among them then also
    # waits for its look at the engine, so it may run out of time just after the first answer. Any poll
    # sent after the first answer must answer at once.
    answered = [entry for entry in log if isinstance(entry[3], tuple)]
    print("polls (path, sent, seconds, outcome):", *[(p, round(t, 2), round(d, 3), o if isinstance(o, str) else o[0])
                                                     for p, t, d, o in log], sep="\n")
    first_answer = min(sent + seconds for _, sent, seconds, _ in answered)
    late = [entry for entry in log if entry[3] == "timeout" and entry[1] >= first_answer]
    assert not late, f"{len(late)} of {len(log)} polls sent after the API worker answered timed out: {late[:5]}"
    boot_waits = [entry for entry in log if entry[3] == "timeout"]
    assert all(first_answer - sent < 10 for _, sent, _, _ in boot_waits), boot_waits
    after_boot = [seconds for _, sent, seconds, _ in answered if sent >= first_answer]
    assert after_boot and max(after_boot) < 1.0, sorted(after_boot)[-5:]
    for path, _, _, (status, body) in answered:
        if path == "/livez":
            assert (status, body) == (200, {"status": "alive"})
        elif status == 503:
            assert body["status"] == "loading" and body["reason"], body
        else:
            assert (status, body) == (200, {"status": "ready"})
    statuses = [outcome[0] for path, _, _, outcome in answered if path == "/readyz"]
    assert statuses[-1] == 200 and statuses.count(200) == 1  # polling stopped at the first 200
