"""An ASGI middleware in front of the API: optional bearer keys and a request-size cap.

- API keys (optional): when keys are configured, every route except health, docs and the web page
  needs `Authorization: Bearer <key>`, compared in constant time; 401 otherwise. `/metrics` is open
  or guarded by configuration.
- Admin routes (`admin_paths`, the adapter routes of adapter_admin.py): only the admin key opens them
  (`SEG_ADMIN_KEY`, compared in constant time); an API key is no admin key: 401.
- Size: a request whose Content-Length is over the cap is answered 413 before its body is read; a
  body without a length is counted as it streams and cut off at the cap.

Its refusals have the one error shape (`errors.py`, whose middleware runs outside this one and adds
the request id, `Retry-After` on refusals and the log line).
"""

from __future__ import annotations

import hmac

from .errors import INVALID_REQUEST, send_error

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/", "/docs.json", "/schema.json", "/ui"})
OPEN_PREFIXES = ("/static_content/", "/ui/")


async def _send_json(send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send_error(send, status, message, kind="unauthorized" if status == 401 else INVALID_REQUEST,
                     headers=headers)


class RequestGuard:
    def __init__(self, app, *, api_keys: tuple[str, ...] = (), metrics_public: bool = True,
                 max_body_bytes: dict[str, int] | None = None, default_max_body_bytes: int = 32 * 1024 * 1024,
                 admin_key: str | None = None, admin_paths: frozenset[str] = frozenset()):
        self.app = app
        self.api_keys = tuple(k.encode() for k in api_keys if k)
        self.admin_key = admin_key.encode() if admin_key else None
        self.admin_paths = admin_paths if admin_key else frozenset()
        self.metrics_public = metrics_public
        self.max_body_bytes = max_body_bytes or {}
        self.default_max_body_bytes = default_max_body_bytes

    def _needs_key(self, path: str) -> bool:
        if not self.api_keys or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return False
        return not (path == "/metrics" and self.metrics_public)

    def _authorized(self, headers: dict[bytes, bytes], keys: tuple[bytes, ...] | None = None) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        # Compare against every key, always: the time taken says nothing about which key nearly matched.
        matches = [hmac.compare_digest(token.strip(), key) for key in (self.api_keys if keys is None else keys)]
        return any(matches)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = dict(scope.get("headers", []))
        if path in self.admin_paths:
            if not self._authorized(headers, (self.admin_key,)):
                return await _send_json(
                    send, 401, "missing or wrong admin key: send the header 'Authorization: Bearer <SEG_ADMIN_KEY>' "
                               "(API keys do not open the adapter routes)", [(b"www-authenticate", b"Bearer")])
        elif self._needs_key(path) and not self._authorized(headers):
            return await _send_json(
                send, 401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                [(b"www-authenticate", b"Bearer")],
            )
        limit = self.max_body_bytes.get(path, self.default_max_body_bytes)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _send_json(send, 413, f"the request body is {int(declared)} bytes; the limit is {limit}")
        if declared:
            return await self.app(scope, receive, send)
        return await self._capped(scope, receive, send, limit)

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
