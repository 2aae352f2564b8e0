"""Health probes that answer at once: `/readyz` and `/livez` (and `/healthz`) on the public service.

BentoML's own `/readyz` asks the engine service with a 5 s timeout, and requests queue behind it
while the engine loads its models: a poll sent during start-up was seen to hang for minutes. Here an
ASGI middleware answers the probes itself, before any BentoML route:

- `/livez`, `/healthz`: 200 while this process serves (the engine's restarts are BentoML's concern,
  and a liveness probe that failed during a long model load would make Kubernetes kill the pod);
- `/readyz`: 200 once the engine has answered its own readiness check (it does only after loading
  and warming up every model); 503 `{"status": "loading", "reason": ...}` before. After the first
  success a slow answer means a busy engine (generation saturates the CPU), still ready; an engine
  silent for `stale_after_s` seconds, or one that refuses connections, is reported not ready.

Every probe answers within `check_timeout_s` plus a few milliseconds.

With `SEG_DEBUG_MODULES=true` (tests), `GET /debug/modules` answers the process id and the top-level
modules this worker has imported: how the tests see, from inside, that a public tier never loads
torch or transformers.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any, Protocol

LIVENESS_PATHS = frozenset({"/livez", "/healthz"})
READINESS_PATH = "/readyz"
DEBUG_MODULES_PATH = "/debug/modules"


class NotReady(Exception):  # noqa: N818 -- a state, not a failure of the probe
    """Raised by an engine's `is_ready` when it answers but will not serve this tier (the message says why:
    a wrong token, another release's wire format); /readyz reports the message."""


class EngineProbe(Protocol):
    async def is_ready(self, timeout: int | None = None) -> bool: ...


class Readiness:
    """The engine's readiness as seen from the public service, asked with a short timeout."""

    def __init__(self, check_timeout_s: float = 0.5, stale_after_s: float = 60.0) -> None:
        self.check_timeout_s = check_timeout_s
        self.stale_after_s = stale_after_s
        self.engine: EngineProbe | None = None
        self._last_ok: float | None = None

    def attach(self, engine: EngineProbe) -> None:
        """Called by the public service once it holds its client of the engine."""
        self.engine = engine

    async def check(self) -> tuple[bool, str]:
        """(ready, reason): never waits longer than `check_timeout_s`."""
        if self.engine is None:
            return False, "the API worker is starting"
        try:
            ok = await asyncio.wait_for(self.engine.is_ready(1), timeout=self.check_timeout_s)
        except TimeoutError:
            ok = None  # no answer yet: loading, or busy
        except NotReady as exc:
            return False, str(exc)
        except Exception:  # the engine's socket refused or dropped the connection
            return False, "the model engine is unavailable; it restarts on its own"
        now = time.monotonic()
        if ok:
            self._last_ok = now
            return True, "ready"
        if self._last_ok is None:
            return False, "the model engine is loading and warming up its models"
        if ok is None and now - self._last_ok < self.stale_after_s:
            return True, "ready (the engine is busy)"
        return False, f"the model engine has not answered for {now - self._last_ok:.0f} s"


def _json_response(status: int, body: dict[str, Any]) -> tuple[dict, dict]:
    payload = json.dumps(body).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                    (b"cache-control", b"no-store")],
    }
    return start, {"type": "http.response.body", "body": payload}


class HealthProbes:
    """ASGI middleware: answers the probe paths itself, passes everything else on."""

    def __init__(self, app, *, readiness: Readiness, debug_modules: bool = False) -> None:
        self.app = app
        self.readiness = readiness
        self.debug_modules = debug_modules

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path in LIVENESS_PATHS:
            status, body = 200, {"status": "alive"}
        elif path == READINESS_PATH:
            ready, reason = await self.readiness.check()
            status, body = (200, {"status": "ready"}) if ready else (503, {"status": "loading", "reason": reason})
        elif path == DEBUG_MODULES_PATH and self.debug_modules:
            status, body = 200, {"pid": os.getpid(), "modules": sorted({m.partition(".")[0] for m in sys.modules})}
        else:
            return await self.app(scope, receive, send)
        start, message = _json_response(status, body)
        await send(start)
        await send(message if scope.get("method") != "HEAD" else {**message, "body": b""})
