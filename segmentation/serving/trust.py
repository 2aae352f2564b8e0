"""Trust between the tiers: what the engine accepts from the network, and from whom.

The engine (`SegmentationEngine`) is reachable by anything that reaches its port: in Kubernetes any pod
of the cluster, in one server any process of the same user (BentoML's Unix socket). So it:

- **never deserializes anything but JSON**: BentoML would `pickle.loads` a body sent as
  `application/vnd.bentoml+pickle` to any service that is not the bento's entry service, before any
  validation (code execution). `EngineGate` answers every other media type 415 before a byte is read,
  and the public tier talks JSON to the engine in one server too (`engines.py`);
- **trusts a caller only with the shared secret** (`SEG_ENGINE_TOKEN` / `SEG_ENGINE_TOKEN_FILE`), sent as
  `Authorization: Bearer <token>` and compared in constant time; probes and metrics stay open;
- **speaks one wire format version** (`WIRE_VERSION`, header `X-Seg-Wire-Version`): a public tier of
  another release is refused with both versions named, rather than misunderstood;
- **refuses to start exposed**: served alone on an address other than loopback, without a token, it
  stops with the reason (`SEG_ENGINE_INSECURE=true` allows it for those who secure the network
  otherwise). The engine of one server listens on a Unix socket in a private directory: no token needed.

Every request field is checked again by the engine itself (bento.py's `EngineItem`, the pool): the
public tier's checks are a courtesy to clients, not a boundary.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import socket
import sys

from .errors import INVALID_REQUEST, send_error
from .framing import JSON_ONLY, check_media_type, has_body

logger = logging.getLogger(__name__)

# The format of the engine's requests and answers. Raise it whenever EngineItem, EngineOutcome or the
# routes change in a way an older or newer peer would misread. v3: EngineItem.cut_after, the prediction's
# prompt_tokens, finish_reason, tokens and logprobs, and the /predict_stream route. v4: the adapter routes
# (/load_lora_adapter, /unload_lora_adapter: adapter_admin.py) and /describe's lora_slots and root.
WIRE_VERSION = "4"
WIRE_VERSION_HEADER = "x-seg-wire-version"

# Open without the token: what probes and Prometheus scrape (GET or HEAD only).
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
# The engine's API routes: POST with a JSON body only (/predict_stream answers server-sent events; the adapter
# routes exist only with SEG_RUNTIME_ADAPTERS=true, and answer 404 after the token otherwise).
API_PATHS = frozenset({"/predict", "/predict_stream", "/describe", "/load_lora_adapter", "/unload_lora_adapter"})


def bearer_token(headers: dict[bytes, bytes]) -> bytes | None:
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


class EngineGate:
    """ASGI middleware in front of the engine: token, methods, media type and wire version, checked on
    the headers alone, before BentoML reads (let alone deserializes) a body. Every answer carries the
    engine's wire version."""

    def __init__(self, app, *, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._versioned(send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        headers = dict(scope.get("headers", []))
        if path in OPEN_PATHS:
            if method not in ("GET", "HEAD"):
                return await send_error(send, 405, f"{path} answers GET and HEAD only", kind=INVALID_REQUEST,
                                        headers=[(b"allow", b"GET, HEAD")])
            return await self.app(scope, receive, send)
        if self.token is not None and not self._authorized(headers):
            return await send_error(send, 401, "missing or wrong engine token: send "
                                               "'Authorization: Bearer <SEG_ENGINE_TOKEN>'", kind="unauthorized",
                                    headers=[(b"www-authenticate", b"Bearer")])
        if path not in API_PATHS:
            return await self.app(scope, receive, send)  # BentoML's docs and schema (after the token)
        if method != "POST":
            return await send_error(send, 405, f"{path} answers POST only", kind=INVALID_REQUEST,
                                    headers=[(b"allow", b"POST")])
        refusal = check_media_type(headers.get(b"content-type"), accepted=JSON_ONLY, has_body=has_body(headers))
        if refusal is not None:
            return await send_error(send, refusal.status, refusal.message, kind=INVALID_REQUEST)
        theirs = headers.get(WIRE_VERSION_HEADER.encode(), b"").decode("latin-1").strip()
        if theirs != WIRE_VERSION:
            return await send_error(
                send, 409, f"wire format version mismatch: this engine speaks v{WIRE_VERSION}, the caller "
                           f"v{theirs or '1 (no version header)'}; run the same release in both tiers",
                kind=INVALID_REQUEST)
        return await self.app(scope, receive, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        token = bearer_token(headers)
        return token is not None and hmac.compare_digest(token, self.token)

    @staticmethod
    def _versioned(send):
        async def wrapped(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (WIRE_VERSION_HEADER.encode(), WIRE_VERSION.encode())]}
            await send(message)

        return wrapped


# --- refusing to start exposed ----------------------------------------------------------------------


def listening_address(argv: list[str] | None = None):
    """What this BentoML worker listens on: `getsockname()` of the socket its arbiter passed as `--fd N`
    (a path for a Unix socket, `(host, port, ...)` for TCP); None outside a BentoML worker."""
    argv = sys.argv if argv is None else argv
    try:
        fd = int(argv[argv.index("--fd") + 1])
    except (ValueError, IndexError):
        return None
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            return sock.getsockname()
    except OSError:
        return None


def is_private(address) -> bool:
    """A Unix socket, or a TCP address on loopback: only this machine (or pod) reaches it."""
    if address is None or isinstance(address, (str, bytes)):
        return True
    try:
        return ipaddress.ip_address(address[0]).is_loopback
    except ValueError:
        return False


def exposure_problem(address, *, token: str | None, insecure: bool) -> str | None:
    """Why an engine listening on `address` must not start (None: it may)."""
    if token or insecure or is_private(address):
        return None
    host = address[0] if isinstance(address, tuple) else address
    return (f"the engine listens on {host}, reachable from other machines, and has no token: set "
            "SEG_ENGINE_TOKEN (or SEG_ENGINE_TOKEN_FILE, a mounted secret) to the same value in the engine "
            "and the public tier, or SEG_ENGINE_INSECURE=true if the network is secured otherwise")
