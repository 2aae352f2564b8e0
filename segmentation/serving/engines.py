"""The public service's link to the model engine: in the same server, or remote engine replicas.

- `LocalEngine`: the engine BentoML runs beside the public service (`bentoml.depends`); items are
  pickled over BentoML's own socket. One server, the default.
- `RemoteEngines` (`SEG_ENGINE_URL`): one or more engine tiers served alone (`bentoml serve
  service:SegmentationEngine`), called over HTTP with JSON (httpx). Each request goes to the replica
  with the fewest requests in flight; a host name is resolved to all its addresses (a headless
  Kubernetes Service names every ready engine pod) and re-resolved every few seconds. A replica
  that refuses a connection is left alone for a second and the request tries the next one, so an
  engine that dies or restarts is answered 503 with `Retry-After` at once, and served again as soon
  as it is back; a replica with `max_in_flight` requests open takes no more (503 at once rather than
  a pile of requests behind a slow engine).

Both raise `EngineError` (status, message without internals, `retry_after`) for anything but an
answer; predictions are pure, so trying one request on a second replica never changes an answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from .api import RequestError
from .bento import EngineItem, EngineOutcome

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
CONNECTION_TRIES = 4  # tries of one engine call over the in-server client's pooled connections


class EngineError(RequestError):
    """No answer from the engine: 503 (or the engine's 429/504) with a message fit for the client."""

    def __init__(self, message: str, status: int = 503, retry_after: int | None = RETRY_AFTER_S):
        super().__init__(message, status, retry_after)


UNAVAILABLE = "the model engine is unavailable (restarting or unreachable); retry shortly"
OVERLOADED = "the model engine is overloaded; retry in a few seconds"


class LocalEngine:
    """The engine BentoML serves in the same server (a `bentoml.depends` proxy)."""

    def __init__(self, dependency) -> None:
        self.dependency = dependency

    async def describe(self) -> list[dict]:
        return await self.dependency.to_async.describe()

    async def is_ready(self, timeout: int | None = None) -> bool:
        return await self.dependency.is_ready(timeout)

    async def predict(self, item: EngineItem) -> EngineOutcome:
        import aiohttp
        import bentoml

        try:
            for attempt in range(1, CONNECTION_TRIES + 1):
                try:
                    [outcome] = await self.dependency.to_async.predict([item])
                    break
                except (aiohttp.ClientError, OSError) as exc:
                    # The inter-service client may pick pooled connections the engine has closed
                    # (BrokenPipe, ServerDisconnected: after a burst the pool holds many idle ones past
                    # the engine's keep-alive); a prediction is pure, so another try is safe.
                    if attempt == CONNECTION_TRIES:
                        raise
                    logger.warning("engine connection failed (%s); trying again", exc)
        except bentoml.exceptions.ServiceUnavailable as exc:
            # The adaptive batcher sheds load it cannot serve within SEG_MAX_LATENCY_MS.
            raise EngineError(OVERLOADED) from exc
        except Exception as exc:  # the engine worker died or restarts: the client may retry
            logger.exception("engine call failed")
            raise EngineError(UNAVAILABLE) from exc
        return outcome

    async def close(self) -> None:
        pass


@dataclass
class Replica:
    url: str
    client: httpx.AsyncClient
    in_flight: int = 0
    down_until: float = 0.0
    served: int = 0

    def usable(self, now: float) -> bool:
        return now >= self.down_until


@dataclass
class _Origin:
    """One configured URL: its scheme, host and port, and the replica URLs it resolved to."""

    url: str
    scheme: str
    host: str
    port: int
    resolved: list[str] = field(default_factory=list)
    resolved_at: float = -1e9


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class RemoteEngines:
    """Engine replicas over HTTP: least requests in flight first, refused replicas skipped for a while."""

    def __init__(self, urls: list[str], *, timeout_s: float, max_in_flight: int, connect_timeout_s: float = 1.0,
                 resolve_every_s: float = 5.0, down_for_s: float = 1.0) -> None:
        if not urls:
            raise ValueError("no engine URL")
        self.origins = [self._origin(u) for u in urls]
        self.max_in_flight = max_in_flight
        self.resolve_every_s = resolve_every_s
        self.down_for_s = down_for_s
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.replicas: dict[str, Replica] = {}
        self._turn = itertools.count()
        self._resolving = asyncio.Lock()

    @staticmethod
    def _origin(url: str) -> _Origin:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return _Origin(url, parts.scheme, parts.hostname, port)

    def _replica(self, url: str) -> Replica:
        if url not in self.replicas:
            # One pooled client per replica; a connection per request in flight at most.
            self.replicas[url] = Replica(url, httpx.AsyncClient(
                base_url=url, timeout=self.timeout,
                limits=httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight),
            ))
        return self.replicas[url]

    async def _resolve(self, origin: _Origin) -> list[str]:
        """The origin's replica URLs: an IP literal as is; a name as every address it resolves to."""
        if _is_address(origin.host) or origin.scheme == "https":  # TLS needs the name itself
            return [origin.url]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                origin.host, origin.port, type=socket.SOCK_STREAM, family=socket.AF_INET)
        except OSError as exc:
            logger.warning("cannot resolve engine host %s (%s)", origin.host, exc)
            return origin.resolved or [origin.url]
        addresses = sorted({info[4][0] for info in infos})
        return [f"{origin.scheme}://{address}:{origin.port}" for address in addresses] or [origin.url]

    async def _current(self) -> list[Replica]:
        now = time.monotonic()
        stale = [o for o in self.origins if now - o.resolved_at >= self.resolve_every_s]
        if stale:
            async with self._resolving:
                for origin in stale:
                    if time.monotonic() - origin.resolved_at >= self.resolve_every_s:
                        origin.resolved = await self._resolve(origin)
                        origin.resolved_at = time.monotonic()
        return [self._replica(url) for origin in self.origins for url in origin.resolved]

    def _order(self, replicas: list[Replica]) -> list[Replica]:
        """Usable replicas, fewest in flight first (ties in turn), then those recently refused."""
        now = time.monotonic()
        start = next(self._turn)
        rotated = [replicas[(start + i) % len(replicas)] for i in range(len(replicas))]
        usable = sorted((r for r in rotated if r.usable(now)), key=lambda r: r.in_flight)
        return usable + [r for r in rotated if not r.usable(now)]

    async def _post(self, path: str, body: dict) -> httpx.Response:
        replicas = self._order(await self._current())
        if all(r.in_flight >= self.max_in_flight for r in replicas):
            raise EngineError(OVERLOADED)
        last: Exception | None = None
        for replica in replicas:
            if replica.in_flight >= self.max_in_flight:
                continue
            replica.in_flight += 1
            try:
                response = await replica.client.post(path, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Refused or unreachable: nothing was sent; leave it alone briefly, try the next.
                replica.down_until = time.monotonic() + self.down_for_s
                last = exc
                continue
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                # The engine closed the connection (a stopping or crashed engine): try the next.
                replica.down_until = time.monotonic() + self.down_for_s
                last = exc
                continue
            except httpx.TimeoutException as exc:
                raise EngineError("the model engine did not answer in time; retry later", 504, None) from exc
            finally:
                replica.in_flight -= 1
            replica.down_until = 0.0
            replica.served += 1
            return response
        logger.warning("no engine replica answered %s (%s)", path, last)
        raise EngineError(UNAVAILABLE)

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.status_code == 200:
            return
        if response.status_code == 429 or response.status_code == 503:
            raise EngineError(OVERLOADED, response.status_code)
        if response.status_code == 504:
            raise EngineError("the model engine did not answer in time; retry later", 504, None)
        logger.error("engine answered %d: %s", response.status_code, response.text[:500])
        raise EngineError(UNAVAILABLE)

    async def describe(self) -> list[dict]:
        response = await self._post("/describe", {})
        self._check(response)
        return response.json()

    async def predict(self, item: EngineItem) -> EngineOutcome:
        response = await self._post("/predict", {"items": [item.model_dump(mode="json")]})
        self._check(response)
        [outcome] = response.json()
        return EngineOutcome.model_validate(outcome)

    async def is_ready(self, timeout: int | None = None) -> bool:
        """Ready when one replica's own /readyz says so (it does once its models are warm)."""
        replicas = await self._current()

        async def ready(replica: Replica) -> bool:
            try:
                response = await replica.client.get("/readyz", timeout=timeout or 5)
            except httpx.HTTPError:
                return False
            return response.status_code == 200

        return any(await asyncio.gather(*(ready(r) for r in replicas)))

    async def close(self) -> None:
        await asyncio.gather(*(r.client.aclose() for r in self.replicas.values()))
