"""An ASGI middleware in front of the API: optional bearer keys and a request-size cap.

- API keys (optional): when keys are configured, every route except health, docs and the web page
  needs `Authorization: Bearer <key>`, compared in constant time; 401 otherwise. `/metrics` is open
  or guarded by configuration.
- Size: a request whose Content-Length is over the cap is answered 413 before its body is read; a
  body without a length is counted as it streams and cut off at the cap.
- Refusals say when to retry: a 429 or 503 without `Retry-After` gets `Retry-After: 1`.
- One error shape: BentoML answers bad input in several shapes (`[{"error": ...}]`, or
  `{"error": ..., "detail": [pydantic errors]}` while its OpenAPI document promises a string
  `detail`); 4xx bodies are rewritten to `{"error": message, "detail": message}` naming the fields.
"""

from __future__ import annotations

import hmac
import json

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/", "/docs.json", "/schema.json", "/ui"})
OPEN_PREFIXES = ("/static_content/", "/ui/")


async def _send_json(send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": message}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    *headers],
    })
    await send({"type": "http.response.body", "body": body})


def _field_errors(detail: list) -> str:
    parts = []
    for item in detail:
        if isinstance(item, dict):
            where = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body",))
            parts.append(f"{where or 'request'}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)


def normalize_error_body(body: bytes) -> bytes | None:
    """`{"error": str, "detail": str}` for BentoML's other error shapes; None when already fine."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if isinstance(data, list) and data and isinstance(data[0], dict) and "error" in data[0]:
        message = "; ".join(str(d.get("error", "")) for d in data)
    elif isinstance(data, dict) and isinstance(data.get("detail"), list):
        fields = _field_errors(data["detail"])
        message = f"invalid request: {fields}" if fields else str(data.get("error", "invalid request"))
    else:
        return None
    return json.dumps({"error": message, "detail": message}).encode()


class RequestGuard:
    def __init__(self, app, *, api_keys: tuple[str, ...] = (), metrics_public: bool = True,
                 max_body_bytes: dict[str, int] | None = None, default_max_body_bytes: int = 32 * 1024 * 1024):
        self.app = app
        self.api_keys = tuple(k.encode() for k in api_keys if k)
        self.metrics_public = metrics_public
        self.max_body_bytes = max_body_bytes or {}
        self.default_max_body_bytes = default_max_body_bytes

    def _needs_key(self, path: str) -> bool:
        if not self.api_keys or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return False
        return not (path == "/metrics" and self.metrics_public)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        # Compare against every key, always: the time taken says nothing about which key nearly matched.
        matches = [hmac.compare_digest(token.strip(), key) for key in self.api_keys]
        return any(matches)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = dict(scope.get("headers", []))
        if self._needs_key(path) and not self._authorized(headers):
            return await _send_json(
                send, 401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                [(b"www-authenticate", b"Bearer")],
            )
        limit = self.max_body_bytes.get(path, self.default_max_body_bytes)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _send_json(send, 413, f"the request body is {int(declared)} bytes; the limit is {limit}")
        send = self._normalizing(send)
        if declared:
            return await self.app(scope, receive, send)
        return await self._capped(scope, receive, send, limit)

    @staticmethod
    def _normalizing(send):
        """Buffer 4xx JSON answers (small) and rewrite them to the one error shape."""
        held: dict = {}

        async def wrapped(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if message["status"] in (429, 503) and b"retry-after" not in headers:
                    # BentoML's own refusals (max_concurrency, a full batch queue): say when to retry.
                    message = {**message, "headers": [*message.get("headers", []), (b"retry-after", b"1")]}
                if 400 <= message["status"] < 500 and headers.get(b"content-type", b"").startswith(b"application/json"):
                    held["start"], held["body"] = message, b""
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                body = normalize_error_body(held["body"]) or held["body"]
                start = held.pop("start")
                headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        return wrapped

    async def _capped(self, scope, receive, send, limit: int):
        """A body without Content-Length: count it, and end it at the cap."""
        seen = 0
        started = False
        over = False

        async def counting_receive():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message):
            nonlocal started
            if over and not started:
                return  # the app answers a disconnected client; we answer 413 below instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _send_json(send, 413, f"the request body is over the limit of {limit} bytes")
