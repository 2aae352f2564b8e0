"""image_url fetching: allowed downloads from a local server, and every refusal of the SSRF policy."""

import asyncio
import io

import pytest
from imageserver import ImageServer
from PIL import Image

from segmentation.serving.fetch import FetchError, UrlPolicy, fetch_image


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = png_bytes()


@pytest.fixture(scope="module")
def site():
    routes = {
        "/img.png": (200, {"Content-Type": "image/png"}, PNG),
        "/octet": (200, {"Content-Type": "application/octet-stream"}, PNG),
        "/page": (200, {"Content-Type": "text/html"}, b"<html></html>"),
        "/big.png": (200, {"Content-Type": "image/png"}, b"x" * 5000),
        "/missing": (404, {}, b""),
    }
    with ImageServer(routes) as server:
        for i in range(6):
            server.routes[f"/hop{i}"] = (302, {"Location": f"/hop{i + 1}"}, b"")
        server.routes["/hop6"] = (200, {"Content-Type": "image/png"}, PNG)
        server.routes["/to-img"] = (301, {"Location": "/img.png"}, b"")
        yield server


ALLOW_LOOPBACK = UrlPolicy(max_bytes=1000, timeout_s=5, allowlist=("127.0.0.1",))


def fetch(url, policy=ALLOW_LOOPBACK):
    return asyncio.run(fetch_image(url, policy))


def test_allowlisted_download(site):
    assert fetch(site.url("/img.png")) == PNG
    assert fetch(site.url("/octet")) == PNG


def test_allowlisted_by_host_name(site):
    policy = UrlPolicy(timeout_s=5, allowlist=("localhost",))
    assert fetch(site.url("/img.png", host="localhost"), policy) == PNG


def test_redirects_are_followed_and_rechecked(site):
    assert fetch(site.url("/to-img")) == PNG
    with pytest.raises(FetchError, match="redirected more than 3"):
        fetch(site.url("/hop0"))


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [("/page", 415, "content type 'text/html'"), ("/big.png", 413, "larger than the limit of 1000"),
     ("/missing", 400, "HTTP 404")],
)
def test_refused_answers(site, path, status, message):
    with pytest.raises(FetchError, match=message) as info:
        fetch(site.url(path))
    assert info.value.status == status


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "2130706433", "0177.0.0.1", "0x7f.1", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0",
     "10.1.2.3", "192.168.0.1", "172.16.5.4", "169.254.169.254", "[fe80::1]", "224.0.0.1", "100.64.0.1",
     "[fc00::1]", "240.0.0.1"],
)
def test_non_public_addresses_are_refused_without_the_allowlist(site, host):
    url = f"http://{host}:{site.port}/img.png"
    before = sum(site.hits.values())
    # httpx itself rejects some odd notations; either way nothing is fetched.
    with pytest.raises(FetchError, match="non-public address|not a valid URL"):
        fetch(url, UrlPolicy(timeout_s=2))
    assert sum(site.hits.values()) == before  # nothing was fetched


def test_allowlisted_network(site):
    assert fetch(site.url("/img.png"), UrlPolicy(timeout_s=5, allowlist=("127.0.0.0/8",))) == PNG


def test_redirect_to_a_private_address_is_refused(site):
    # Allowed by name, then redirected to an address that only a name-less check would catch.
    site.routes["/to-private"] = (302, {"Location": f"http://127.0.0.1:{site.port}/img.png"}, b"")
    with pytest.raises(FetchError, match="non-public address"):
        fetch(site.url("/to-private", host="localhost"), UrlPolicy(timeout_s=5, allowlist=("localhost",)))


@pytest.mark.parametrize(
    ("url", "message"),
    [("file:///etc/passwd", "scheme 'file'"), ("ftp://example.com/x.png", "scheme 'ftp'"),
     ("gopher://x", "scheme 'gopher'"), ("http://", "no host"), ("not a url", "scheme"),
     ("http://nonexistent.invalid/x.png", "could not be resolved")],
)
def test_bad_urls(url, message):
    with pytest.raises(FetchError, match=message):
        fetch(url, UrlPolicy(timeout_s=2))
