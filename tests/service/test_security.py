"""API keys, request-size caps and input limits on a server started with tight settings."""

from __future__ import annotations

import base64
import io

import bentoml
import httpx
import numpy as np
import pytest
from PIL import Image
from servers import kill_tree, start_server

KEY = "s3cret-key"
MAX_IMAGE_BYTES = 300_000


@pytest.fixture(scope="module")
def guarded(server_home, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("secrets") / "api_key"
    key_file.write_text(f"other-key\n{KEY}\n")
    srv = start_server(server_home, {
        "SEG_API_KEY_FILE": str(key_file),
        "SEG_METRICS_PUBLIC": "false",
        "SEG_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        "SEG_MAX_PIXELS": "1000000",
        "SEG_MAX_CLASSES": "8",
    })
    yield srv
    kill_tree(srv.process.pid)


def png(width=64, height=48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


AUTH = {"Authorization": f"Bearer {KEY}"}


def body(**extra):
    return {"image_base64": base64.b64encode(png()).decode(), "prompt": "cat", **extra}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": "Basic " + KEY}])
@pytest.mark.parametrize("route", ["/segment", "/detect", "/render", "/models", "/segment_batch", "/metrics"])
def test_routes_need_the_key(guarded, route, headers):
    response = httpx.post(guarded.url + route, json=body(), headers=headers, timeout=30) if route != "/metrics" \
        else httpx.get(guarded.url + route, headers=headers, timeout=30)
    assert response.status_code == 401
    assert "Authorization: Bearer" in response.json()["error"]


def test_the_right_key_works_over_http_and_the_python_client(guarded, tmp_path):
    assert httpx.post(guarded.url + "/segment", json=body(), headers=AUTH, timeout=60).status_code == 200
    assert httpx.get(guarded.url + "/metrics", headers=AUTH, timeout=30).status_code == 200
    picture = tmp_path / "x.png"
    picture.write_bytes(png())
    with bentoml.SyncHTTPClient(guarded.url, token=KEY, timeout=60) as client:
        assert client.segment(image=picture, prompt="cat")["width"] == 64


@pytest.mark.parametrize("route", ["/livez", "/readyz", "/docs.json"])
def test_health_and_docs_stay_open(guarded, route):
    assert httpx.get(guarded.url + route, timeout=10).status_code == 200


def test_oversized_upload_is_refused_before_it_is_read(guarded):
    blob = b"\0" * 3_000_000
    response = httpx.post(guarded.url + "/segment", files={"image": ("big.png", blob, "image/png")},
                          data={"prompt": "cat"}, headers=AUTH, timeout=30)
    assert response.status_code == 413 and "limit" in response.json()["error"]


def test_oversized_chunked_body_is_cut_off(guarded):
    def chunks():
        for _ in range(100):
            yield b"x" * 65536

    headers = {**AUTH, "Content-Type": "application/json"}
    response = httpx.post(guarded.url + "/segment", content=chunks(), headers=headers, timeout=30)
    assert response.status_code == 413


def test_upload_over_the_image_limit_but_under_the_body_cap(guarded):
    blob = png() + b"\0" * (MAX_IMAGE_BYTES + 10)
    response = httpx.post(guarded.url + "/segment", files={"image": ("x.png", blob, "application/octet-stream")},
                          data={"prompt": "cat"}, headers=AUTH, timeout=30)
    assert response.status_code == 413 and f"limit is {MAX_IMAGE_BYTES}" in response.json()["error"]


def test_too_many_pixels(guarded):
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 1000)).save(buffer, "PNG")  # 2 MP, small file
    response = httpx.post(guarded.url + "/segment", json={"image_base64": base64.b64encode(buffer.getvalue()).decode(),
                                                          "prompt": "cat"}, headers=AUTH, timeout=30)
    assert response.status_code == 413 and "2000x1000" in response.json()["error"]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [("x" * 100_000, "prompt: is too long; the limit is 1000 characters"),
     (";".join("c" for _ in range(300)), "prompt: must name 1 to 8 classes"),
     ("cat\x00dog", "without '<', '>' or control characters"), ("cat\u200bdog", "U+200B")],
)
def test_prompt_limits(guarded, prompt, message):
    response = httpx.post(guarded.url + "/segment", json=body(prompt=prompt), headers=AUTH, timeout=30)
    assert response.status_code == 400 and message in response.json()["error"]


def test_octet_stream_upload_is_judged_by_content(guarded, tmp_path):
    response = httpx.post(guarded.url + "/segment", files={"image": ("blob", png(), "application/octet-stream")},
                          data={"prompt": "cat"}, headers=AUTH, timeout=60)
    assert response.status_code == 200


def test_exif_rotated_upload_reports_upright_size(guarded):
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (80, 30), (10, 200, 10)).save(buffer, "JPEG", exif=exif)
    response = httpx.post(guarded.url + "/segment", files={"image": ("r.jpg", buffer.getvalue(), "image/jpeg")},
                          data={"prompt": "cat"}, headers=AUTH, timeout=60)
    assert (response.json()["width"], response.json()["height"]) == (30, 80)




def test_too_many_batch_entries(guarded):
    entries = [{"image_base64": body()["image_base64"], "prompt": "cat"}] * 17
    response = httpx.post(guarded.url + "/segment_batch", json={"requests": entries}, headers=AUTH, timeout=30)
    assert response.status_code == 400 and "requests: has 17 items; the limit is 16" in response.json()["error"]


# --- the OpenAI-compatible API (/v1) behind the same keys and caps ---------------------------------------


def openai_client(url: str, key: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def chat(image_b64: str) -> dict:
    return {"model": "demo/paligemma2-tiny-random", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_b64}"}},
        {"type": "text", "text": "cat"}]}]}


def test_v1_needs_the_key_as_the_sdk_sends_it(guarded):
    import openai

    for headers in ({}, {"Authorization": KEY}):  # no key; a key without its scheme
        response = httpx.get(guarded.url + "/v1/models", headers=headers, timeout=30)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with openai_client(guarded.url, "wrong") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            client.models.list()
        assert caught.value.body["code"] == "invalid_api_key" and "Authorization: Bearer" in caught.value.message
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(**chat(body()["image_base64"]))
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(**chat(body()["image_base64"]), stream=True)
    with openai_client(guarded.url, KEY) as client:
        assert [m.id for m in client.models.list().data] == ["demo/paligemma2-tiny-random"]
        assert client.chat.completions.create(**chat(body()["image_base64"])).choices[0].message.segmentation


def test_v1_oversize_is_413_in_openai_s_shape(guarded):
    import openai

    noise = np.random.default_rng(1).integers(0, 256, 600_000, dtype=np.uint8).tobytes()  # over the body cap
    with openai_client(guarded.url, KEY) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(**chat(base64.b64encode(noise).decode()))
        assert caught.value.status_code == 413 and caught.value.body["code"] == "request_too_large"
        assert "limit" in caught.value.body["message"]
        buffer = io.BytesIO()
        Image.new("RGB", (2000, 1000)).save(buffer, "PNG")  # 2 MP: over SEG_MAX_PIXELS, a small body
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(**chat(base64.b64encode(buffer.getvalue()).decode()))
        assert caught.value.status_code == 413 and "2000x1000" in caught.value.body["message"]
