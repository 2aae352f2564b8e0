"""Checking a request's framing before BentoML parses it: method, media type, multipart structure.

BentoML picks its deserializer from the Content-Type (`application/vnd.bentoml+pickle` ends in
`pickle.loads`), reads any other type as JSON, and parses forms with Starlette: a multipart body
without a boundary, with broken parts, a file under a text field's name (`-F file=@x.png`) or text
that is not UTF-8 raised inside that parsing and was answered 500. Here, before a byte reaches it:

- `check_media_type` (pure; the engine tier uses it in `trust.EngineGate`): only the listed media
  types; pickle and everything else → 415 before the body is read; a body without a Content-Type
  → 415; a `charset` other than UTF-8 → 415.
- `RequestFraming` (the public tier): methods per route (405 with `Allow`), then for the API routes
  the body: JSON passes to BentoML's strict parser (invalid JSON, bad UTF-8, deep nesting and
  out-of-range numbers are its 400s); multipart and url-encoded forms are parsed here, strictly,
  and handed on rewritten in one canonical form (see `read_multipart`).

Form fields mean what the Python client and curl mean by them: a text part of a string field is
taken as its text (a part holding a JSON string literal, as `bentoml.SyncHTTPClient` sends, is
decoded once; `null` means no value where the field allows it); a text part of any other field is
JSON (`true`, `3`, `[[0, 0, 5, 0, 5, 5]]`); a part declaring `Content-Type: application/json` is
JSON whatever its field. Files only under file fields, text only under text fields.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode

from .errors import INVALID_REQUEST, send_error

JSON = "application/json"
MULTIPART = "multipart/form-data"
FORM = "application/x-www-form-urlencoded"
PICKLE = "application/vnd.bentoml+pickle"
PUBLIC_MEDIA_TYPES = frozenset({JSON, MULTIPART, FORM})
JSON_ONLY = frozenset({JSON})

# Starlette's form parser refuses text values over 1 MiB (`max_part_size`); say so ourselves.
MAX_TEXT_PART_BYTES = 1024 * 1024
MAX_PARTS = 64
MAX_PART_HEADER_BYTES = 16 * 1024
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(frozen=True)
class Refusal:
    """An answer to give instead of passing a request on: status and a message for the client."""

    status: int
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


_PARAM = re.compile(r'\s*;\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;"]*)')


def parse_params(text: str) -> dict[str, str] | None:
    """`; name=value; name="quoted \\" value"` parameters (names lower case), or None when malformed."""
    params: dict[str, str] = {}
    position = 0
    for match in _PARAM.finditer(text):
        if match.start() != position:
            return None
        name, value = match.group(1).lower(), match.group(2).strip()
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[name] = value
        position = match.end()
    return params if not text[position:].strip(" \t;") else None


def parse_media_type(value: str) -> tuple[str, dict[str, str]] | None:
    """`type/subtype` (lower case) and its parameters, or None when the header is malformed."""
    kind, semicolon, rest = value.partition(";")
    kind = kind.strip().lower()
    main, slash, sub = kind.partition("/")
    if not slash or not _TOKEN.fullmatch(main) or not _TOKEN.fullmatch(sub):
        return None
    params = parse_params(semicolon + rest)
    return None if params is None else (kind, params)


def _accepted_list(accepted: frozenset[str]) -> str:
    order = [JSON, MULTIPART, FORM]
    return ", ".join([t for t in order if t in accepted] + sorted(accepted - set(order)))


def check_media_type(content_type: bytes | str | None, *, accepted: frozenset[str] = JSON_ONLY,
                     has_body: bool = True) -> Refusal | None:
    """None when a request body of `content_type` may be read, else the 415 to answer.

    Pure: the public tier passes `PUBLIC_MEDIA_TYPES`, the engine tier `JSON_ONLY`. A request without a
    Content-Type is accepted only when it has no body (`has_body=False`: Content-Length 0).
    """
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    what = f"accepted: {_accepted_list(accepted)}"
    if not content_type or not content_type.strip():
        if not has_body:
            return None
        return Refusal(415, f"the request has a body but no Content-Type header; {what}")
    parsed = parse_media_type(content_type)
    if parsed is None:
        return Refusal(415, f"the Content-Type header is malformed; {what}")
    kind, params = parsed
    if kind == PICKLE:
        return Refusal(415, f"serialized Python objects ({PICKLE}) are never accepted; {what}")
    if kind not in accepted:
        return Refusal(415, f"Content-Type {kind} is not accepted; {what}")
    charset = params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        return Refusal(415, f"{kind} bodies must be UTF-8, not {charset}")
    return None


def has_body(headers: dict[bytes, bytes]) -> bool:
    """Whether the request announces a body (a non-zero Content-Length, or a chunked one)."""
    length = headers.get(b"content-length")
    if length is not None:
        return length.strip() != b"0"
    return b"transfer-encoding" in headers


# ---- what a route's form may hold ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RouteForm:
    """The fields of one API route's request body."""

    fields: tuple[str, ...]
    files: frozenset[str] = frozenset()
    # String fields: a plain-text part is their value as sent.
    strings: frozenset[str] = frozenset()
    nullable: frozenset[str] = frozenset()

    @classmethod
    def from_schema(cls, schema: dict, files: frozenset[str] = frozenset()) -> RouteForm:
        """From a JSON schema of the route's input model (pydantic's `model_json_schema()`)."""
        strings, nullable = set(), set()
        for name, prop in schema.get("properties", {}).items():
            options = prop.get("anyOf", [prop])
            types = {o.get("type") for o in options}
            if "null" in types:
                nullable.add(name)
            if types - {"null"} == {"string"} and name not in files:
                strings.add(name)
        return cls(tuple(schema.get("properties", {})), frozenset(files), frozenset(strings), frozenset(nullable))

    def accepted(self) -> str:
        return ", ".join(self.fields) if self.fields else "(none: send an empty body or {})"


class FramingError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Part:
    name: str
    content: bytes
    filename: str | None = None
    content_type: str | None = None
    extra_headers: list[str] = field(default_factory=list)


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name.decode("latin-1")):
            raise FramingError("a multipart part has a malformed header line")
        try:
            text = value.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise FramingError("a multipart part header is not UTF-8") from None
        key = name.decode("latin-1").lower()
        if key in headers:
            raise FramingError(f"a multipart part repeats its {key} header")
        headers[key] = text
    return headers


def split_multipart(body: bytes, boundary: str) -> list[Part]:
    """The parts of a multipart/form-data body; FramingError says what is malformed."""
    delimiter = b"--" + boundary.encode("latin-1")
    start = 0 if body.startswith(delimiter) else body.find(b"\r\n" + delimiter)
    if start < 0:
        raise FramingError("the multipart body does not contain its boundary; "
                           "send parts separated by the boundary the Content-Type names")
    if start:
        start += 2  # a preamble ends with CRLF before the first delimiter
    position = start + len(delimiter)
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", position):
            return parts  # the closing delimiter; an epilogue after it is ignored
        if not body.startswith(b"\r\n", position):
            # Transport padding (spaces, tabs) may follow a delimiter line.
            end_of_line = body.find(b"\r\n", position)
            if end_of_line < 0 or body[position:end_of_line].strip(b" \t"):
                raise FramingError("a multipart boundary line is malformed")
            position = end_of_line
        position += 2
        if len(parts) >= MAX_PARTS:
            raise FramingError(f"the multipart body has more than {MAX_PARTS} parts")
        header_end = body.find(b"\r\n\r\n", position)
        if body.startswith(b"\r\n", position):
            header_end = position - 2
        if header_end < 0 or header_end - position > MAX_PART_HEADER_BYTES:
            raise FramingError("a multipart part has no end to its headers (a blank line)")
        headers = _parse_headers(body[position:header_end])
        content_start = header_end + 4
        content_end = body.find(b"\r\n" + delimiter, content_start)
        if content_end < 0:
            raise FramingError("the multipart body ends before its closing boundary ('--' + boundary + '--')")
        parts.append(_part(headers, body[content_start:content_end]))
        position = content_end + 2 + len(delimiter)


def _part(headers: dict[str, str], content: bytes) -> Part:
    kind, semicolon, rest = headers.get("content-disposition", "").partition(";")
    params = parse_params(semicolon + rest)
    if kind.strip().lower() != "form-data" or params is None or not params.get("name"):
        raise FramingError("each multipart part needs 'Content-Disposition: form-data; name=\"...\"'")
    filename = params.get("filename", params.get("filename*"))
    return Part(name=params["name"], content=content, filename=filename, content_type=headers.get("content-type"))


def _text_value(route: RouteForm, name: str, text: str, declared: str | None) -> str:
    """The JSON-ish text BentoML will `json.loads` for a form field (see the module docstring)."""
    if declared is not None:
        parsed = parse_media_type(declared)
        kind = parsed[0] if parsed else None
        if kind is None or not (kind == JSON or kind.endswith("+json") or kind == "text/plain"):
            raise FramingError(f"field '{name}': part Content-Type {declared.split(';')[0]} is not accepted; "
                               "text parts are plain text or application/json")
        if kind != "text/plain":
            try:
                json.loads(text)
            except ValueError:
                raise FramingError(f"field '{name}' declares application/json but is not valid JSON") from None
            return text
    if name not in route.strings:
        return text  # JSON for booleans, numbers, lists, objects; BentoML keeps invalid JSON as text
    if text == "null" and name in route.nullable:
        return text
    if text.startswith('"'):
        try:
            if isinstance(json.loads(text), str):
                return text
        except ValueError:
            pass
    return json.dumps(text, ensure_ascii=False)


def _check_name(route: RouteForm, name: str, seen: set[str]) -> None:
    if name not in route.fields:
        raise FramingError(f"unknown field '{name[:100]}'; accepted fields: {route.accepted()}")
    if name in seen:
        raise FramingError(f"field '{name}' was sent more than once; send each field once")
    seen.add(name)


def _text(name: str, content: bytes) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        raise FramingError(f"field '{name}' is not valid UTF-8 text; files go in a file field") from None


def _check_size(name: str, value: str) -> None:
    if len(value.encode()) > MAX_TEXT_PART_BYTES:
        raise FramingError(f"field '{name}' is over the {MAX_TEXT_PART_BYTES} bytes a form text value may hold; "
                           "upload images as files, or send the request as JSON")


def read_multipart(body: bytes, boundary: str, route: RouteForm) -> bytes:
    """The body checked against `route` and rewritten canonically (one header layout, file parts named
    `upload`, text parts as BentoML's JSON decoding reads them as the module docstring says)."""
    seen: set[str] = set()
    out: list[bytes] = []
    delimiter = b"--" + boundary.encode("latin-1")
    for part in split_multipart(body, boundary):
        _check_name(route, part.name, seen)
        quoted = part.name.replace("\\", "\\\\").replace('"', '\\"')
        if part.name in route.files:
            if part.filename is None:
                raise FramingError(f"'{part.name}' must be a file upload (a part with a filename); "
                                   "send a URL as 'image_url' and base64 data as 'image_base64'")
            head = (f'Content-Disposition: form-data; name="{quoted}"; filename="upload"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n").encode()
            content = part.content
        else:
            if part.filename is not None:
                files = ", ".join(f"'{f}'" for f in sorted(route.files)) or "none on this route"
                raise FramingError(f"field '{part.name}' takes text, not a file; file fields: {files}")
            value = _text_value(route, part.name, _text(part.name, part.content), part.content_type)
            _check_size(part.name, value)
            head = f'Content-Disposition: form-data; name="{quoted}"\r\n\r\n'.encode()
            content = value.encode()
        out += [delimiter, b"\r\n", head, content, b"\r\n"]
    out += [delimiter, b"--\r\n"]
    return b"".join(out)


def read_form(body: bytes, route: RouteForm) -> bytes:
    """An url-encoded body checked against `route` and rewritten (as `read_multipart`)."""
    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body),
                          encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise FramingError("the form is not valid UTF-8 (or holds raw non-ASCII bytes)") from None
    except ValueError:
        raise FramingError("the form is malformed; send name=value pairs joined by '&'") from None
    seen: set[str] = set()
    out = []
    for name, value in pairs:
        _check_name(route, name, seen)
        if name in route.files:
            raise FramingError(f"'{name}' is a file: upload it with Content-Type: multipart/form-data")
        value = _text_value(route, name, value, None)
        _check_size(name, value)
        out.append((name, value))
    return urlencode(out).encode()


# ---- the middleware ------------------------------------------------------------------------------------------

READ_METHODS = frozenset({"GET", "HEAD"})


class RequestFraming:
    """ASGI middleware of the public tier: the methods each route takes (405 with `Allow` otherwise), and
    for the API routes (POST) the body's media type and form structure (see the module docstring).

    `routes`: the API routes and their forms; `read_paths` / `read_prefixes`: routes answering GET and
    HEAD only (probes, metrics, docs, the web page); `get_routes`: API routes without required fields
    that also answer GET, as the POST of an empty JSON object (`GET /models`: a read, so the method a
    newcomer tries first; BentoML's APIs take POST only). Other paths pass on (404 from the router).
    """

    def __init__(self, app, *, routes: dict[str, RouteForm], read_paths: frozenset[str] = frozenset(),
                 read_prefixes: tuple[str, ...] = (), get_routes: frozenset[str] = frozenset(),
                 accepted: frozenset[str] = PUBLIC_MEDIA_TYPES) -> None:
        self.app = app
        self.routes = routes
        self.read_paths = read_paths
        self.read_prefixes = read_prefixes
        self.get_routes = get_routes
        self.accepted = accepted

    def _allowed(self, path: str) -> frozenset[str] | None:
        if path in self.routes:
            return frozenset({"GET", "POST"}) if path in self.get_routes else frozenset({"POST"})
        if path in self.read_paths or path.startswith(self.read_prefixes):
            return READ_METHODS
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        allowed = self._allowed(path)
        if allowed is not None and method not in allowed:
            allow = ", ".join(m for m in ("GET", "HEAD", "POST") if m in allowed)
            return await send_error(send, 405, f"{method} is not allowed on {path}; allowed: {allow}",
                                    kind=INVALID_REQUEST, headers=[(b"allow", allow.encode())])
        if path not in self.routes:
            return await self.app(scope, receive, send)
        if method == "GET":  # a get_route: the POST of an empty JSON object (the query string is ignored)
            body = b"{}"
            scope = {**scope, "method": "POST", "headers": [(k, v) for k, v in scope.get("headers", []) if k not in (
                b"content-length", b"transfer-encoding", b"content-type")] + [
                (b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]}
            return await self.app(scope, _replay(body, receive), send)
        headers = dict(scope.get("headers", []))
        content_type = headers.get(b"content-type")
        refusal = check_media_type(content_type, accepted=self.accepted, has_body=has_body(headers))
        if refusal is not None:
            return await send_error(send, refusal.status, refusal.message, kind=INVALID_REQUEST)
        if content_type is None:
            return await self.app(scope, receive, send)
        kind, params = parse_media_type(content_type.decode("latin-1"))
        if kind == JSON:
            return await self.app(scope, receive, send)  # BentoML's JSON parser is strict (see above)
        if kind == MULTIPART:
            boundary = params.get("boundary", "")
            if not _BOUNDARY.fullmatch(boundary):
                return await send_error(send, 400, "multipart/form-data needs a boundary parameter of 1 to 70 "
                                        "characters (Content-Type: multipart/form-data; boundary=...)",
                                        kind=INVALID_REQUEST)
        body = await _read_body(receive)
        if body is None:
            return None  # the client left
        try:
            if kind == MULTIPART:
                body = read_multipart(body, params["boundary"], self.routes[path])
            else:
                body = read_form(body, self.routes[path])
        except FramingError as exc:
            return await send_error(send, exc.status, str(exc), kind=INVALID_REQUEST)
        scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", []) if k not in (
            b"content-length", b"transfer-encoding")] + [(b"content-length", str(len(body)).encode())]}
        return await self.app(scope, _replay(body, receive), send)


async def _read_body(receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the client's disconnect, when it comes

    return replay
