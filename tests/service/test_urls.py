"""image_url through the server: the allow-listed local host works, nothing else is ever fetched."""

import io

import httpx
import pytest
from imageserver import ImageServer
from PIL import Image


@pytest.fixture(scope="module")
def site():
    buffer = io.BytesIO()
    Image.new("RGB", (120, 80), (200, 10, 10)).save(buffer, "JPEG")
    with ImageServer({"/photo.jpg": (200, {"Content-Type": "image/jpeg"}, buffer.getvalue())}) as server:
        yield server


def test_image_url_on_an_allowlisted_host(server, site):
    # The test server runs with SEG_URL_ALLOWLIST=localhost.
    response = httpx.post(server.url + "/segment", json={"image_url": site.url("/photo.jpg", "localhost"),
                                                          "prompt": "cat"}, timeout=60)
    assert response.status_code == 200, response.text
    assert (response.json()["width"], response.json()["height"]) == (120, 80)
    assert site.hits["/photo.jpg"] >= 1


def test_image_url_to_a_loopback_address_is_refused(server, site):
    before = dict(site.hits)
    response = httpx.post(server.url + "/segment", json={"image_url": site.url("/photo.jpg"), "prompt": "cat"},
                          timeout=60)
    assert response.status_code == 400 and "non-public address" in response.json()["error"]
    assert site.hits == before


def test_url_in_the_multipart_file_field_is_never_fetched(server, site):
    before = dict(site.hits)
    response = httpx.post(server.url + "/segment", files={"image": (None, site.url("/photo.jpg", "localhost"))},
                          data={"prompt": "cat"}, timeout=60)
    assert response.status_code == 400, response.text
    assert "image_url" in response.text
    assert site.hits == before


def test_bare_url_json_body_is_never_fetched(server, site):
    before = dict(site.hits)
    response = httpx.post(server.url + "/segment", content=site.url("/photo.jpg", "localhost"),
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    assert site.hits == before
