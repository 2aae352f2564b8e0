"""Download an `image_url` without becoming a way into the server's network (SSRF guard).

Only http and https. The host is resolved once and every address is checked: loopback, private,
link-local, multicast, reserved and unspecified addresses (IPv4 and IPv6, IPv4-mapped IPv6, and odd
notations such as `2130706433` or `0177.0.0.1`, which the resolver turns into the addresses checked)
are refused unless the allow-list admits them. The connection goes to the checked address (the Host
header and TLS name stay the original host), so DNS cannot change its answer between check and
connect. Redirects are followed by hand, each one checked the same way; the body is streamed under a
byte cap, and its content type must be an image (or octet-stream).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field

import httpx

MAX_REDIRECTS = 3


class FetchError(ValueError):
    """A URL the server refuses or could not download; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UrlPolicy:
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    # Hosts (exact names), addresses or networks (CIDR) admitted even when not public.
    allowlist: tuple[str, ...] = field(default_factory=tuple)

    def _allowed_networks(self):
        networks = []
        for entry in self.allowlist:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                continue  # a host name
        return networks

    def check_address(self, host: str, address: str) -> None:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if host.lower() in (h.lower() for h in self.allowlist):
            return
        if any(ip in network for network in self._allowed_networks()):
            return
        if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified:
            raise FetchError(
                f"image_url host '{host}' resolves to {ip}, a non-public address; only public hosts "
                "may be fetched (operators can allow hosts with SEG_URL_ALLOWLIST)", status=400
            )


async def resolve(host: str, port: int, timeout_s: float = 10.0) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout_s)
    except (socket.gaierror, UnicodeError, TimeoutError) as exc:
        raise FetchError(f"image_url host '{host}' could not be resolved", status=400) from exc
    return list(dict.fromkeys(info[4][0] for info in infos))


async def fetch_image(url: str, policy: UrlPolicy) -> bytes:
    """The bytes at `url`, under `policy`; raises FetchError with a status to answer."""
    for _ in range(MAX_REDIRECTS + 1):
        response_or_url = await _fetch_once(url, policy)
        if isinstance(response_or_url, bytes):
            return response_or_url
        url = response_or_url
    raise FetchError(f"image_url redirected more than {MAX_REDIRECTS} times", status=400)


async def _fetch_once(url: str, policy: UrlPolicy) -> bytes | str:
    """The body, or the next URL when the server redirects."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise FetchError("image_url is not a valid URL") from exc
    if parsed.scheme not in ("http", "https"):
        raise FetchError(f"image_url scheme '{parsed.scheme or '(none)'}' is not accepted; use http or https")
    host = parsed.host
    if not host:
        raise FetchError("image_url has no host")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = await resolve(host, port, policy.timeout_s)
    for address in addresses:
        policy.check_address(host, address)
    headers = {"Host": parsed.netloc.decode("ascii"), "Accept": "image/*"}
    extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
    last_error: Exception | None = None
    for address in addresses:  # connect only to checked addresses, in the resolver's order
        target = parsed.copy_with(host=address if ":" not in address else f"[{address}]")
        try:
            return await _get(target, headers, extensions, parsed, policy)
        except httpx.ConnectError as exc:
            last_error = exc
    raise FetchError("image_url could not be reached (connection refused or no route)", status=400) from last_error


async def _get(target: httpx.URL, headers: dict, extensions: dict, parsed: httpx.URL, policy: UrlPolicy):
    try:
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(policy.timeout_s), follow_redirects=False, trust_env=False
        ) as client:
            request = client.build_request("GET", target, headers=headers, extensions=extensions)
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect:
                    return str(parsed.join(response.headers.get("location", "")))
                if response.status_code != 200:
                    raise FetchError(f"image_url answered HTTP {response.status_code}", status=400)
                kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if kind and not (kind.startswith("image/") or kind == "application/octet-stream"):
                    raise FetchError(f"image_url has content type '{kind}'; an image is expected", status=415)
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                    raise _too_large(policy)
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body.extend(chunk)
                    if len(body) > policy.max_bytes:
                        raise _too_large(policy)
                return bytes(body)
            finally:
                await response.aclose()
    except httpx.ConnectError:
        raise
    except httpx.TimeoutException as exc:
        raise FetchError(f"image_url timed out after {policy.timeout_s:g}s", status=400) from exc
    except httpx.HTTPError as exc:
        raise FetchError("image_url could not be downloaded (the connection or the HTTP answer failed)",
                         status=400) from exc


def _too_large(policy: UrlPolicy) -> FetchError:
    return FetchError(f"image_url body is larger than the limit of {policy.max_bytes} bytes", status=413)
