"""The served HTTP API through the BentoML clients and plain HTTP, against a real `bentoml serve`."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
from answers import same_answer
from PIL import Image
from pycocotools import mask as coco_mask

from segmentation.model.encoding import png_base64_to_mask

DEMO_MODEL = "demo/paligemma2-tiny-random"


def write_image(path: Path, width: int, height: int, seed: int, fmt: str = "PNG") -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, fmt)
    return path


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    sizes = [(320, 240), (97, 180), (640, 480), (224, 224)]
    return [write_image(folder / f"img{i}.png", w, h, seed=i) for i, (w, h) in enumerate(sizes)]


def check_body(body: dict, width: int, height: int, mask_format: str = "rle") -> None:
    assert body["model"] == DEMO_MODEL
    assert (body["width"], body["height"]) == (width, height)
    assert isinstance(body["text"], str) and body["prompt"].startswith(("segment ", "detect "))
    assert isinstance(body["objects"], list)
    for obj in body["objects"]:
        assert set(obj) == {"label", "score", "box", "box_normalized", "area", "mask"}
        x0, y0, x1, y1 = obj["box"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert all(0.0 <= v <= 1.0 for v in obj["box_normalized"])
        assert 0.0 < obj["score"] <= 1.0
        if mask_format == "none" or obj["mask"] is None:
            assert obj["mask"] is None or mask_format != "none"
            continue
        assert obj["mask"]["format"] == mask_format
        if mask_format == "polygon":
            for polygon in obj["mask"]["polygons"]:
                xs, ys = polygon[0::2], polygon[1::2]
                assert min(xs) >= x0 and max(xs) <= x1 - 1 and min(ys) >= y0 and max(ys) <= y1 - 1
            continue
        if mask_format == "rle":
            rle = {"size": obj["mask"]["size"], "counts": obj["mask"]["counts"].encode()}
            mask = coco_mask.decode(rle).astype(bool)
        else:
            mask = png_base64_to_mask(obj["mask"]["data"])
        assert mask.shape == (height, width)
        assert mask.sum() == obj["area"]
        outside = mask.copy()
        outside[y0:y1, x0:x1] = False
        assert not outside.any(), "mask pixels outside the object's box"


def test_segment_multipart_upload_httpx(server, images):
    path = images[0]
    with path.open("rb") as f:
        response = httpx.post(server.url + "/segment", files={"image": (path.name, f, "image/png")},
                              data={"prompt": "cat ; dog"}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    check_body(body, 320, 240)
    assert body["prompt"] == "segment cat ; dog"
    assert body["objects"], body["text"]


@pytest.mark.parametrize("mask_format", ["rle", "png", "polygon", "none"])
def test_segment_json_base64_every_mask_format(server, images, mask_format):
    response = httpx.post(server.url + "/segment", json={
        "image_base64": b64(images[1]), "prompt": "segment person", "mask_format": mask_format,
    }, timeout=60)
    assert response.status_code == 200, response.text
    check_body(response.json(), 97, 180, mask_format)


def test_segment_returns_input_image(server, images):
    response = httpx.post(server.url + "/segment", json={
        "image_base64": b64(images[2]), "prompt": "car", "return_input_image": True,
    }, timeout=60)
    body = response.json()
    picture = Image.open(io.BytesIO(base64.b64decode(body["input_image"])))
    assert picture.format == "PNG" and picture.size == (224, 224)


def test_detect_has_boxes_and_no_masks(server, images):
    response = httpx.post(server.url + "/detect", json={"image_base64": b64(images[0]), "prompt": "cat ; dog"},
                          timeout=60)
    body = response.json()
    assert body["prompt"] == "detect cat ; dog"
    check_body(body, 320, 240, "none")
    assert body["objects"] and all(o["mask"] is None for o in body["objects"])


def test_render_returns_png_of_the_input_size(server, images):
    with images[2].open("rb") as f:
        response = httpx.post(server.url + "/render", files={"image": ("x.png", f, "application/octet-stream")},
                              data={"prompt": "cat"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.format == "PNG" and picture.size == (640, 480) and picture.mode == "RGB"


def test_sync_client_every_api(server, images):
    with bentoml.SyncHTTPClient(server.url, timeout=60) as client:
        body = client.segment(image=images[0], prompt="cat", mask_format="png")
        check_body(body, 320, 240, "png")
        detected = client.detect(image=images[3], prompt="dog")
        check_body(detected, 224, 224, "none")
        overlay = client.render(image=images[1], prompt="cat")
        assert overlay.size == (97, 180)
        listed = client.models()
        [served] = listed["models"]
        assert served.pop("batched_equals_solo").startswith("batched ≡ solo on cpu")
        assert served.pop("graphs")["captured"] is False  # a CPU: no CUDA graphs (tests/service/test_engine_paths.py)
        cpu = served.pop("cpu")  # this CPU's facts (segmentation/model/cpu.py): whatever the machine, all said
        assert set(cpu) == {"model", "capability", "native_bfloat16", "via", "row_isolation"}
        assert served.pop("dtype_reason").startswith("auto: ")
        assert served == {"id": DEMO_MODEL, "image_size": 224, "default": True, "device": "cpu",
                          "dtype": "bfloat16" if cpu["native_bfloat16"] else "float32"}
        batch = client.segment_batch(requests=[
            {"image_base64": b64(images[0]), "prompt": "cat"},
            {"image_base64": "not base64!", "prompt": "cat"},
            {"image_base64": b64(images[3]), "prompt": "dog", "task": "detect", "mask_format": "none"},
        ])
    assert len(batch) == 3
    check_body(batch[0], 320, 240)
    assert batch[1]["status"] == 400 and "base64" in batch[1]["error"]
    check_body(batch[2], 224, 224, "none")


def test_async_client(server, images):
    async def main():
        async with bentoml.AsyncHTTPClient(server.url, timeout=60) as client:
            return await client.segment(image=images[2], prompt="tree", mask_format="polygon")

    check_body(asyncio.run(main()), 640, 480, "polygon")


def test_batch_answers_equal_solo_answers(server, images):
    entries = [{"image_base64": b64(p), "prompt": prompt} for p, prompt in zip(images, ["cat", "dog ; cat", "a", "b"])]
    batch = httpx.post(server.url + "/segment_batch", json={"requests": entries}, timeout=120).json()
    for entry, answer in zip(entries, batch):
        alone = httpx.post(server.url + "/segment", json=entry, timeout=60).json()
        assert same_answer(answer, alone)


def test_openapi_lists_every_api(server):
    spec = httpx.get(server.url + "/docs.json", timeout=10).json()
    for route in ("/segment", "/detect", "/render", "/segment_batch", "/models"):
        assert route in spec["paths"], route
    assert set(spec["paths"]["/models"]) == {"get", "post"}


def test_get_models_answers_like_post(server):
    got = httpx.get(server.url + "/models", timeout=10)
    posted = httpx.post(server.url + "/models", json={}, timeout=10)
    assert got.status_code == 200 and got.json() == posted.json()
    assert [m["id"] for m in got.json()["models"]] == [DEMO_MODEL]
    refused = httpx.delete(server.url + "/models", timeout=10)
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, POST"


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"json": {"prompt": "cat"}}, 400, "no image was sent"),
        ({"json": {"prompt": "cat", "image_base64": "AAAA", "image_url": "http://example.com/x.png"}}, 400,
         "2 images were sent"),
        ({"json": {"prompt": "cat", "image_base64": base64.b64encode(b"hello world").decode()}}, 400,
         "not a readable image"),
        ({"json": {"prompt": "cat", "image_base64": "%%%"}}, 400, "not valid base64"),
        ({"files": {"image": ("x.png", b"\x89PNG\r\n\x1a\n garbage", "image/png")}, "data": {"prompt": "cat"}}, 400,
         "image"),
        ({"json": {"prompt": "", "image_base64": "PLACEHOLDER"}}, 400, "prompt: must not be empty"),
        ({"json": {"prompt": "segment ; ;", "image_base64": "PLACEHOLDER"}}, 400, "prompt: must name 1 to 32 classes"),
        ({"json": {"prompt": "cat", "image_base64": "PLACEHOLDER", "model": "google/other"}}, 400,
         f"served models: {DEMO_MODEL}"),
        ({"json": {"prompt": "cat", "image_base64": "PLACEHOLDER", "mask_format": "jpeg"}}, 400,
         "mask_format: Input should be 'rle', 'png', 'polygon' or 'none'"),
        ({"json": {"prompt": "cat", "image_url": "file:///etc/passwd"}}, 400, "image_url: must be an http:// or https://"),
        ({"json": {"prompt": "cat", "image_url": "http://127.0.0.1:1/x.png"}}, 400, "non-public address"),
    ],
)
def test_client_mistakes_are_4xx_with_a_message(server, images, kwargs, status, message):
    if "json" in kwargs and kwargs["json"].get("image_base64") == "PLACEHOLDER":
        kwargs = {"json": {**kwargs["json"], "image_base64": b64(images[3])}}
    response = httpx.post(server.url + "/segment", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.text
    # ...and the server keeps serving.
    ok = httpx.post(server.url + "/segment", json={"image_base64": b64(images[3]), "prompt": "cat"}, timeout=60)
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [({"prompt": "cat", "mask-format": "png"}, "mask-format"),
     ({"prompt": ["cat"]}, "prompt"),
     ({"prompt": "cat", "return_input_image": "maybe"}, "return_input_image")],
)
def test_unknown_fields_and_wrong_types_are_400(server, images, body, message):
    response = httpx.post(server.url + "/segment", json={"image_base64": b64(images[3]), **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert message in response.text


def test_unknown_multipart_field_is_400(server, images):
    with images[3].open("rb") as f:
        response = httpx.post(server.url + "/segment", files={"image": f}, data={"prompt": "cat", "promt": "x"},
                              timeout=60)
    assert response.status_code == 400 and "promt" in response.text
