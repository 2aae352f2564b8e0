"""The public service's link to the model engine: over HTTP with JSON, to the engine of this server or
to engine replicas served alone.

- One server (the default): BentoML serves the engine beside the public service on a Unix socket in
  a private directory; `local_engine_url()` finds it. BentoML's own client between services would
  pickle the items, and an engine that unpickles is an engine that runs any code it is sent
  (trust.py): the public tier talks JSON to it like to a remote one.
- Scale out (`SEG_ENGINE_URL`): one or more engine tiers served alone (`bentoml serve
  service:SegmentationEngine`). Each request goes to the replica with the fewest requests in flight;
  a host name is resolved to all its addresses (a headless Kubernetes Service names every ready engine
  pod) and re-resolved every few seconds. A replica that refuses a connection is left alone for a
  second and the request tries the next one, so an engine that dies or restarts is answered 503 with
  `Retry-After` at once, and served again as soon as it is back; a replica with `max_in_flight`
  requests open takes no more (503 at once rather than a pile of requests behind a slow engine).

Every call carries the shared secret (`SEG_ENGINE_TOKEN`) and the wire format version (trust.py); an
engine that refuses either is reported by `/readyz` and in the log with the reason.

`RemoteEngines` raises `EngineError` (status, message without internals, `retry_after`) for anything but
an answer; predictions are pure, so trying one request again or on a second replica never changes an
answer. `predict_stream` reads one request's answer as it decodes (`POST /predict_stream`: server-sent
events, each `data: <JSON>`: `{"text", "tokens", "logprobs"}` as the row decodes, then `{"outcome"}`);
closing it early closes its connection, and the engine then cancels the request (its slot is freed).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from .api import RequestError
from .bento import EngineItem, EngineOutcome
from .probes import NotReady
from .trust import WIRE_VERSION, WIRE_VERSION_HEADER

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
# Tries of one call on one replica when the connection breaks under it: a pooled keep-alive connection
# the engine closed meanwhile fails the first try; a dead engine then refuses the next connection.
CONNECTION_TRIES = 3
# How long a replica's acceptance of our token and wire version is trusted before /readyz asks again.
VERIFIED_FOR_S = 30.0


class EngineError(RequestError):
    """No answer from the engine: 503 (or the engine's 429/504) with a message fit for the client."""

    def __init__(self, message: str, status: int = 503, retry_after: int | None = RETRY_AFTER_S):
        super().__init__(message, status, retry_after)


class EngineRefused(EngineError, NotReady):
    """The engine refuses this tier for good (token, wire version): no retry helps until redeployed."""

    def __init__(self, message: str):
        super().__init__(message, 503, None)


UNAVAILABLE = "the model engine is unavailable (restarting or unreachable); retry shortly"
OVERLOADED = "the model engine is overloaded; retry in a few seconds"
BAD_TOKEN = ("the model engine refused this server's engine token (SEG_ENGINE_TOKEN differs between the "
             "public tier and the engine)")


def local_engine_url(engine_name: str) -> str:
    """The URL of the engine BentoML serves beside the public service in this server: `unix:///…sock`
    (or `http://127.0.0.1:PORT` where BentoML uses TCP between services)."""
    from bentoml._internal.container import BentoMLContainer

    mapping = BentoMLContainer.remote_runner_mapping.get()
    if engine_name not in mapping:
        raise RuntimeError(f"BentoML serves no {engine_name!r} beside this service (mapping: {sorted(mapping)})")
    url = mapping[engine_name]
    if url.startswith("tcp://"):
        return "http://" + url.removeprefix("tcp://")
    return "unix://" + urlsplit(url).path  # BentoML writes file:///…/N.sock


@dataclass
class Replica:
    url: str
    client: httpx.AsyncClient
    in_flight: int = 0
    down_until: float = 0.0
    served: int = 0
    verified_at: float = -1e9  # when it last accepted our token and wire version

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
    """Engine replicas over HTTP: least requests in flight first, refused replicas skipped for a while.

    `urls`: `http(s)://host:port` (a name stands for every address it resolves to) or `unix:///path`
    (the engine of this server). `token`: the engine's shared secret (None: send none).
    """

    def __init__(self, urls: list[str], *, timeout_s: float, max_in_flight: int, token: str | None = None,
                 connect_timeout_s: float = 1.0, resolve_every_s: float = 5.0, down_for_s: float = 1.0) -> None:
        if not urls:
            raise ValueError("no engine URL")
        self.origins = [self._origin(u) for u in urls]
        self.max_in_flight = max_in_flight
        self.resolve_every_s = resolve_every_s
        self.down_for_s = down_for_s
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.headers = {WIRE_VERSION_HEADER: WIRE_VERSION}
        if token:
            self.headers["authorization"] = f"Bearer {token}"
        self.replicas: dict[str, Replica] = {}
        self._turn = itertools.count()
        self._resolving = asyncio.Lock()

    @staticmethod
    def _origin(url: str) -> _Origin:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return _Origin(url, "unix", parts.path, 0)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return _Origin(url, parts.scheme, parts.hostname, port)

    def _replica(self, url: str) -> Replica:
        if url not in self.replicas:
            # One pooled client per replica; a connection per request in flight at most.
            limits = httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight)
            options = dict(base_url=url, timeout=self.timeout, limits=limits, headers=self.headers)
            if url.startswith("unix://"):
                path = urlsplit(url).path
                options.update(base_url="http://engine", transport=httpx.AsyncHTTPTransport(uds=path, limits=limits))
            self.replicas[url] = Replica(url, httpx.AsyncClient(**options))
        return self.replicas[url]

    async def _resolve(self, origin: _Origin) -> list[str]:
        """The origin's replica URLs: an IP literal, a Unix socket or TLS as is; a name as every
        address it resolves to."""
        if origin.scheme in ("unix", "https") or _is_address(origin.host):  # TLS needs the name itself
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
        _, response = await self._send(path, body)
        return response

    async def _send(self, path: str, body: dict, *, stream: bool = False) -> tuple[Replica, httpx.Response]:
        """POST to the replica with the fewest requests in flight. `stream`: the answer's body is left
        unread, and the replica counts the request in flight until the caller closes the response and
        calls `_done(replica)`."""
        replicas = self._order(await self._current())
        if all(r.in_flight >= self.max_in_flight for r in replicas):
            raise EngineError(OVERLOADED)
        last: Exception | None = None
        for replica in replicas:
            if replica.in_flight >= self.max_in_flight:
                continue
            replica.in_flight += 1
            answered = False
            try:
                response = await self._post_to(replica, path, body, stream=stream)
                answered = True
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                    httpx.WriteError) as exc:
                # Refused, unreachable, or closed under the request (a stopping or crashed engine):
                # leave it alone briefly and try the next.
                replica.down_until = time.monotonic() + self.down_for_s
                last = exc
                continue
            except httpx.TimeoutException as exc:
                raise EngineError("the model engine did not answer in time; retry later", 504, None) from exc
            except httpx.HTTPError as exc:  # anything else httpx refuses to do: the client still gets a 503
                logger.error("engine call to %s failed: %s", replica.url, exc)
                raise EngineError(UNAVAILABLE) from exc
            finally:
                if not (stream and answered):
                    replica.in_flight -= 1
            replica.down_until = 0.0
            replica.served += 1
            return replica, response
        logger.warning("no engine replica answered %s (%s)", path, last)
        raise EngineError(UNAVAILABLE)

    @staticmethod
    async def _post_to(replica: Replica, path: str, body: dict, *, stream: bool = False) -> httpx.Response:
        for attempt in range(1, CONNECTION_TRIES + 1):
            try:
                return await replica.client.send(replica.client.build_request("POST", path, json=body), stream=stream)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                # A pooled connection the engine had closed (after a burst the pool holds many idle
                # ones past its keep-alive): another connection, same replica. A prediction is pure.
                if attempt == CONNECTION_TRIES:
                    raise
                logger.info("engine connection to %s broke (%s); trying again", replica.url, type(exc).__name__)
        raise AssertionError("unreachable")

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.status_code == 200:
            return
        if response.status_code == 429 or response.status_code == 503:
            raise EngineError(OVERLOADED, response.status_code)
        if response.status_code == 504:
            raise EngineError("the model engine did not answer in time; retry later", 504, None)
        refusal = refusal_reason(response)
        if refusal is not None:
            logger.error("engine at %s refused this public tier: %s", response.request.url, refusal)
            raise EngineRefused(refusal)
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

    async def predict_stream(self, item: EngineItem) -> AsyncIterator[dict]:
        """One request's answer as its row decodes: `{"text", "tokens", "logprobs"}` events, then
        `{"outcome": EngineOutcome}`. Close the iterator to stop early (`contextlib.aclosing`): its
        connection closes and the engine cancels the request. Raises EngineError when the engine refuses
        the call or the stream breaks off before the outcome."""
        replica, response = await self._send("/predict_stream", {"item": item.model_dump(mode="json")}, stream=True)
        try:
            if response.status_code != 200:
                await response.aread()
                self._check(response)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # the blank line after each event, or an SSE comment
                event = json.loads(line.removeprefix("data:"))
                if "outcome" in event:
                    yield {"outcome": EngineOutcome.model_validate(event["outcome"])}
                    return
                yield event
        except httpx.TimeoutException as exc:
            raise EngineError("the model engine did not answer in time; retry later", 504, None) from exc
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning("the engine's stream from %s broke off: %s", replica.url, exc)
            raise EngineError(UNAVAILABLE) from exc
        finally:
            replica.in_flight -= 1
            await response.aclose()  # an unread stream's connection closes: the engine cancels the request
        logger.warning("the engine's stream from %s ended without an outcome", replica.url)
        raise EngineError(UNAVAILABLE)

    async def broadcast(self, path: str, body: dict) -> list[dict]:
        """POST `body` to every replica this tier knows (the adapter routes: adapter_admin.py), at once; one
        report per replica: `{"replica": url, "status": ..., ...the engine's answer}`, `status` 503 with an
        `error` for a replica that did not answer. Unlike predictions, no replica is skipped."""
        replicas = await self._current()

        async def one(replica: Replica) -> dict:
            try:
                response = await replica.client.post(path, json=body)
            except httpx.HTTPError as exc:
                logger.warning("engine %s did not answer %s: %s", replica.url, path, exc)
                return {"replica": replica.url, "status": 503, "error": "the replica did not answer"}
            refusal = refusal_reason(response)
            if refusal is not None:
                return {"replica": replica.url, "status": 503, "error": refusal}
            if response.status_code != 200:
                logger.error("engine %s answered %s with %d: %s", replica.url, path, response.status_code,
                             response.text[:500])
                return {"replica": replica.url, "status": 503, "error": f"the replica answered {response.status_code}"}
            return {"replica": replica.url, **response.json()}

        return list(await asyncio.gather(*(one(r) for r in replicas)))

    async def is_ready(self, timeout: int | None = None) -> bool:
        """Ready when one replica's own /readyz says so (it does once its models are warm) and it accepts
        this tier's token and wire version; raises EngineRefused when every ready replica refuses them."""
        replicas = await self._current()

        async def ready(replica: Replica) -> str | bool:
            try:
                response = await replica.client.get("/readyz", timeout=timeout or 5)
                if response.status_code != 200:
                    return False
                if time.monotonic() - replica.verified_at < VERIFIED_FOR_S:
                    return True
                check = await replica.client.post("/describe", json={}, timeout=timeout or 5)
            except httpx.HTTPError:
                return False
            refusal = refusal_reason(check)
            if refusal is not None:
                logger.error("engine at %s refused this public tier: %s", replica.url, refusal)
                return refusal
            if check.status_code == 200:
                replica.verified_at = time.monotonic()
                return True
            return False

        answers = await asyncio.gather(*(ready(r) for r in replicas))
        if any(a is True for a in answers):
            return True
        refusals = [a for a in answers if isinstance(a, str)]
        if refusals:
            raise EngineRefused(refusals[0])
        return False

    async def close(self) -> None:
        await asyncio.gather(*(r.client.aclose() for r in self.replicas.values()))


def refusal_reason(response: httpx.Response) -> str | None:
    """Why an engine refuses this tier for good (a wrong token, another wire version), or None."""
    if response.status_code == 401:
        return BAD_TOKEN
    if response.status_code == 409:
        theirs = response.headers.get(WIRE_VERSION_HEADER, "?")
        return (f"the public tier speaks wire format v{WIRE_VERSION} and the model engine v{theirs}: "
                "run the same release in both tiers")
    return None


def stream_event(event: dict) -> str:
    """One event of the engine's `/predict_stream` answer, as `predict_stream` reads it."""
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n"
