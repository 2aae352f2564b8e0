"""One shape for every error answer, a request id on every answer, and a log line per error.

Every answer gets an `X-Request-ID` header: the client's own when it sent a sane one (letters, digits
and `._:+=/-`, at most 128 characters), else a new one. Every error answer (4xx, 5xx) has the body

    {"error": message, "detail": message or more, "request_id": id, "kind": kind}

whoever produced it (the API, BentoML's validation, Starlette's routing, a middleware), and the
server logs one line per error answer carrying the same id: INFO for client mistakes (no traceback),
WARNING for refusals under load, ERROR for server errors. `kind` says whose fault it is:

- `invalid_request`: the request breaks what `/docs.json` states (framing, media type, method,
  fields, types, limits, body size) and never reached the API's code;
- `unusable_input`: the request is valid by the schema but its content cannot be used (an image that
  does not decode or has too many pixels, a refused `image_url`, an unknown model, an empty mask...);
- `unauthorized`, `not_found`, `overloaded` (429/503 with `Retry-After`), `unavailable`, `timeout`,
  `internal`.

Messages never carry exception texts, reprs or paths: those go to the log under the request id.
BentoML logs a client's validation error as an ERROR with a traceback; `quiet_client_errors()`
drops those records (this module's INFO line says the same) and tags BentoML's server-error records
with the request id.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid
from typing import Protocol

logger = logging.getLogger("segmentation.requests")
# The server's root logger passes WARNING and up; the INFO lines for client mistakes are wanted.
logger.setLevel(logging.INFO)

REQUEST_ID_HEADER = "X-Request-ID"
_HEADER_KEY = REQUEST_ID_HEADER.lower().encode()
_SANE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=/-]{0,127}")

INVALID_REQUEST = "invalid_request"
UNUSABLE_INPUT = "unusable_input"
KINDS = (INVALID_REQUEST, UNUSABLE_INPUT, "unauthorized", "not_found", "overloaded", "unavailable", "timeout",
         "internal")

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being answered (set by `ErrorAnswers`), or None outside one."""
    return _request_id.get()


def request_id_from(value: bytes | str | None) -> str:
    """The client's `X-Request-ID` when it is sane, else a new id."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value and _SANE_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


def kind_for(status: int) -> str:
    if status in (401, 403):
        return "unauthorized"
    if status == 404:
        return "not_found"
    if status in (408, 504):
        return "timeout"
    if status == 429:
        return "overloaded"
    if status == 500:
        return "internal"
    if status >= 500:
        return "unavailable"
    return INVALID_REQUEST


def error_body(message: str, *, status: int, kind: str | None = None, detail: str | None = None,
               request_id: str | None = None) -> bytes:
    body = {"error": message, "detail": detail or message, "kind": kind or kind_for(status)}
    request_id = request_id or current_request_id()
    if request_id:
        body["request_id"] = request_id
    return json.dumps(body).encode()


async def send_error(send, status: int, message: str, *, kind: str | None = None,
                     headers: list[tuple[bytes, bytes]] | tuple = ()) -> None:
    """Answer an ASGI request with the one error shape (for middlewares that refuse before the app)."""
    body = error_body(message, status=status, kind=kind)
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    *headers],
    })
    await send({"type": "http.response.body", "body": body})


# ---- turning any error answer into the one shape ----------------------------------------------------------

_UNION_TAG = re.compile(r"[\[\](),]|^(?:constrained|function|nullable|lax|strict)-")


# pydantic's messages in the service's words (the limit first, then what was sent).
_PLAIN_WORDS = [
    (re.compile(r"^String should have at least 1 character$"), "must not be empty"),
    (re.compile(r"^String should have at most (\d+) characters?$"), r"is too long; the limit is \1 characters"),
    (re.compile(r"^List should have at most (\d+) items? after validation, not (\d+)$"),
     r"has \2 items; the limit is \1"),
    (re.compile(r"^List should have at least (\d+) items? after validation, not (\d+)$"),
     r"has \2 items; at least \1 are needed"),
]


def _field_errors(detail: list, pattern_hints: dict[str, str] | None = None) -> str:
    parts = []
    for item in detail:
        if isinstance(item, dict):
            # pydantic names the branches of a union in `loc` (`constrained-str`, `list[...]`): not fields.
            loc = [str(p) for p in item.get("loc", ()) if p != "body" and not _UNION_TAG.search(str(p))]
            message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
            for pattern, replacement in _PLAIN_WORDS:
                message = pattern.sub(replacement, message)
            if message.startswith("String should match pattern"):
                # The pattern itself says little to a person; say what it means.
                hint = (pattern_hints or {}).get(loc[-1] if loc else "")
                message = hint or "does not have the accepted form (see /docs.json)"
            parts.append(f"{'.'.join(loc) or 'request'}: {message}")
    return "; ".join(parts)


_GENERIC = {
    404: "no such route; the API is described at /docs.json",
    405: "method not allowed on this route",
    429: "too many requests at once; retry shortly",
    500: "internal error; the server log has the details under this request id",
    503: "the service is unavailable; retry shortly",
    504: "the request took too long and was stopped",
}


def _reason(status: int) -> str:
    return _GENERIC.get(status, "the request was refused" if status < 500 else "internal error")


def normalize_error(status: int, body: bytes, content_type: bytes = b"application/json",
                    pattern_hints: dict[str, str] | None = None) -> dict:
    """The parts of the one error shape for any error answer: error, detail, kind."""
    data = None
    if content_type.startswith(b"application/json"):
        try:
            data = json.loads(body)
        except ValueError:
            data = None
    kind = None
    detail = None
    if isinstance(data, list) and data and all(isinstance(d, dict) and "error" in d for d in data):
        message = "; ".join(str(d["error"]) for d in data)  # BentoML's InvalidArgument shape
    elif isinstance(data, dict) and isinstance(data.get("detail"), list):  # BentoML's validation errors
        fields = _field_errors(data["detail"], pattern_hints)
        message = f"invalid request: {fields}" if fields else "invalid request"
        kind = INVALID_REQUEST
    elif isinstance(data, dict) and isinstance(data.get("error"), str):
        message = data["error"]
        detail = data.get("detail") if isinstance(data.get("detail"), str) else None
        kind = data.get("kind") if data.get("kind") in KINDS else None
    else:
        message = _reason(status)
    if status >= 500 and kind is None and message.startswith("An unexpected error has occurred"):
        message = _reason(500)  # BentoML's 500: it points at the server log, which has our id
    return {"error": message, "detail": detail or message, "kind": kind or kind_for(status)}


def normalize_error_body(body: bytes) -> bytes | None:
    """`{"error": str, "detail": str}` for BentoML's other error shapes; None when already fine (kept for
    callers of the old guard helper)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not (isinstance(data, list) or (isinstance(data, dict) and isinstance(data.get("detail"), list))):
        return None
    fixed = normalize_error(400, body)
    return json.dumps({"error": fixed["error"], "detail": fixed["detail"]}).encode()


class ErrorShape(Protocol):
    """The error shape of an API with its own (see `ErrorAnswers`)."""

    def message(self, body: bytes) -> str | None: ...

    def body(self, message: str, status: int) -> bytes: ...


class ErrorAnswers:
    """ASGI middleware: request ids, the one error shape, Retry-After on refusals, a log line per error.

    `own_shapes`: path prefix -> the error shape of an API served there that has one of its own (OpenAI's,
    on `/v1/`): `message(body)` reads a body in that shape (None for any other), `body(message, status)`
    writes one. Bodies already in it pass as they are; the other error answers on those paths (an API
    key's 401, a body cap's 413, an unknown route) carry the message the one shape would, in that shape."""

    def __init__(self, app, *, log: logging.Logger = logger, pattern_hints: dict[str, str] | None = None,
                 probes: frozenset[str] = frozenset({"/readyz", "/livez", "/healthz"}),
                 own_shapes: dict[str, ErrorShape] | None = None) -> None:
        self.app = app
        self.log = log
        self.pattern_hints = pattern_hints or {}
        self.own_shapes = own_shapes or {}
        # Probe answers (a 503 `{"status": "loading", "reason": ...}` while the engine loads) are states,
        # not errors: they keep their body and are not logged, polled as they are.
        self.probes = probes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        request_id = request_id_from(headers.get(_HEADER_KEY))
        token = _request_id.set(request_id)
        started = False
        held: dict = {}
        id_header = (_HEADER_KEY, request_id.encode())
        method = scope.get("method", "")

        async def wrapped(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                out = [(k, v) for k, v in message.get("headers", []) if k.lower() != _HEADER_KEY]
                out.append(id_header)
                if status in (429, 503) and not any(k.lower() == b"retry-after" for k, _ in out):
                    out.append((b"retry-after", b"1"))  # BentoML's own refusals say when to retry
                message = {**message, "headers": out}
                if status >= 400 and scope.get("path") not in self.probes:
                    held["start"], held["body"] = message, b""
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                await self._send_error(send, held.pop("start"), held.pop("body"), scope, method)
                return
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        except Exception:
            if started:
                raise
            self.log.exception("request %s: %s %s failed", request_id, method, scope.get("path", ""))
            start = {"type": "http.response.start", "status": 500,
                     "headers": [(b"content-type", b"application/json"), id_header]}
            await self._send_error(send, start, b"", scope, method, logged=True)
        finally:
            _request_id.reset(token)

    async def _send_error(self, send, start: dict, body: bytes, scope, method: str, logged: bool = False):
        status = start["status"]
        headers = dict(start.get("headers", []))
        path = scope.get("path", "")
        shape = next((shape for prefix, shape in self.own_shapes.items() if path.startswith(prefix)), None)
        own = shape.message(body) if shape is not None else None
        fixed = {"error": own, "kind": kind_for(status)} if own is not None else \
            normalize_error(status, body, headers.get(b"content-type", b""), self.pattern_hints)
        request_id = headers[_HEADER_KEY].decode()
        if not logged:
            level = logging.INFO if status < 500 else logging.ERROR if status == 500 else logging.WARNING
            self.log.log(level, "request %s: %s %s answered %d (%s): %s", request_id, method,
                         path, status, fixed["kind"], fixed["error"])
        if shape is None:
            payload = json.dumps({**fixed, "request_id": request_id}).encode()
        else:
            payload = body if own is not None else shape.body(fixed["error"], status)
        payload = b"" if method == "HEAD" else payload
        out = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        out += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({**start, "headers": out})
        await send({"type": "http.response.body", "body": payload})


# ---- BentoML's own log records ----------------------------------------------------------------------------

def _is_client_error(exc: BaseException | None) -> bool:
    if exc is None:
        return False
    try:
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            return True
    except ImportError:  # pragma: no cover
        pass
    code = getattr(getattr(exc, "error_code", None), "value", None)
    return isinstance(code, int) and code < 500


class _BentoRecords(logging.Filter):
    """Drop BentoML's ERROR-with-traceback records for client mistakes (ErrorAnswers logs them at
    INFO); tag the others with the request id."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if _is_client_error(exc):
            return False
        request_id = current_request_id()
        if request_id and isinstance(record.msg, str) and "request " not in record.msg:
            record.msg = f"{record.msg} (request {request_id})"
        return True


_FILTER = _BentoRecords()


def quiet_client_errors(names: tuple[str, ...] = ("bentoml._internal.server.http_app", "bentoml.serve")) -> None:
    """Install the filter on the loggers BentoML reports request failures with (idempotent)."""
    for name in names:
        target = logging.getLogger(name)
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)
