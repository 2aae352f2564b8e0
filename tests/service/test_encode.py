"""POST /encode through plain HTTP against a real `bentoml serve`: every mask form gives the text
`encode_object` gives locally with the served vae-oid.npz, and bad input is answered 400."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from segmentation.data.coco import segmentation_mask
from segmentation.encoder import MaskEncoder, encode_object
from segmentation.model.encoding import mask_to_polygons, mask_to_rle
from segmentation.tokens import parse_objects

H, W = 90, 120


@pytest.fixture(scope="module")
def mask() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return ((yy - 40) / 25) ** 2 + ((xx - 70) / 40) ** 2 <= 1  # an ellipse, rows 15..65, columns 30..110


@pytest.fixture(scope="module")
def expected(tiny_fixtures, mask) -> str:
    return encode_object(MaskEncoder.from_npz(tiny_fixtures / "vae-oid.npz"), mask, "bowl")


def png_bytes(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, "PNG")
    return buffer.getvalue()


def post(server, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/encode", timeout=120, **kwargs)


def test_png_upload(server, mask, expected):
    response = post(server, files={"mask": ("m.png", png_bytes(mask), "image/png")}, data={"label": "bowl"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == expected
    [obj] = parse_objects(body["text"])
    assert body["locs"] == list(obj.locs) and body["codes"] == list(obj.codes) and body["label"] == "bowl"
    assert (body["height"], body["width"]) == (H, W)


def test_base64_rle_and_polygons_give_the_same_text(server, mask, expected, tiny_fixtures):
    as_base64 = post(server, json={"mask_base64": base64.b64encode(png_bytes(mask)).decode(), "label": "bowl"})
    as_rle = post(server, json={"rle": mask_to_rle(mask), "label": "bowl"})
    assert as_base64.status_code == 200 and as_rle.status_code == 200, (as_base64.text, as_rle.text)
    assert as_base64.json()["text"] == as_rle.json()["text"] == expected
    outline = mask_to_polygons(mask)
    polygons = post(server, json={"polygons": outline, "width": W, "height": H, "label": "bowl"})
    assert polygons.status_code == 200, polygons.text
    # An outline through pixel centres fills a little less than the mask (pycocotools' rule): the
    # answer is that of the filled outline, which is nearly the mask.
    filled = segmentation_mask(outline, H, W)
    assert (filled & mask).sum() / (filled | mask).sum() > 0.9
    assert polygons.json()["text"] == encode_object(MaskEncoder.from_npz(tiny_fixtures / "vae-oid.npz"), filled, "bowl")


def test_box_is_used(server, mask, tiny_fixtures):
    box = [0.1, 0.2, 0.8, 0.95]
    response = post(server, json={"rle": mask_to_rle(mask), "label": "bowl", "box": box})
    assert response.status_code == 200, response.text
    local = encode_object(MaskEncoder.from_npz(tiny_fixtures / "vae-oid.npz"), mask, "bowl", box)
    assert response.json()["text"] == local
    assert response.json()["locs"] == [102, 205, 818, 972]


@pytest.mark.parametrize(
    ("body", "message"),
    [({"label": "bowl"}, "no mask was sent"),
     ({"rle": {"size": [2, 2], "counts": "1"}, "polygons": [[0, 0, 1, 0, 1, 1]], "width": 2, "height": 2},
      "2 masks were sent"),
     ({"rle": {"size": [4, 4], "counts": [16]}}, "empty"),
     ({"rle": {"size": [4, 4], "counts": [3, 5]}}, "sum to 8"),
     ({"rle": {"size": "4x4", "counts": "abc"}}, "rle.size"),
     ({"rle": {"size": [2, 2], "counts": "0000"}}, "do not cover the 2x2 image"),
     ({"polygons": [[0, 0, 5, 0, 5, 5, 1]], "width": 8, "height": 8}, "odd count"),
     ({"polygons": [[0, 0, 50, 0, 5, 5]], "width": 8, "height": 8}, "outside the 8x8 image"),
     ({"polygons": [[0, 0, 1e30, 0, 5, 5]], "width": 8, "height": 8}, "polygons.0.2"),
     ({"polygons": [[0, 0, 5, 0, 5, 5]]}, "width"),
     ({"polygons": [[0, 0, 5]], "width": 8, "height": 8}, "polygons.0: has 3 items; at least 6 are needed"),
     ({"mask_base64": "bm90IGFuIGltYWdl"}, "mask: "),
     ({"mask_base64": "###"}, "mask_base64 is not valid base64"),
     ({"rle": {"size": [4, 4], "counts": [0, 16]}, "box": [0.5, 0, 0.2, 1]}, "y1 < y2"),
     ({"rle": {"size": [4, 4], "counts": [0, 16]}, "label": "a ; b"}, "';'"),
     ({"rle": {"size": [4, 4], "counts": [0, 16]}, "lable": "typo"}, "lable")],
)
def test_bad_input_is_400_naming_the_problem(server, body, message):
    response = post(server, json=body)
    assert response.status_code == 400, response.text
    assert message in response.text


def test_concurrent_requests_each_get_their_own_answer(server, mask, expected):
    import concurrent.futures

    other = np.zeros((H, W), bool)
    other[5:30, 10:50] = True
    bodies = [{"rle": mask_to_rle(m), "label": "bowl"} for m in (mask, other) * 4]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: post(server, json=b), bodies))
    assert all(a.status_code == 200 for a in answers)
    assert [a.json()["text"] for a in answers[0::2]] == [expected] * 4
    assert len({a.json()["text"] for a in answers[1::2]}) == 1 and answers[1].json()["text"] != expected
