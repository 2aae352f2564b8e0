"""The client's `labels_from_prompt` and `encode()` against a real `bentoml serve` of the tiny
fixtures, compared with the library (`Segmenter.segment(..., labels_from_prompt=True)`,
`segmentation.encoder.encode_object` with the fixture VAE the server serves)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image
from test_client import assert_same_results, write_image

from segmentation.client import AsyncRemoteSegmenter, RemoteSegmenter, RequestRejected, encode_request_body
from segmentation.encoder import MaskEncoder, encode_object

PROMPTS = ["cat ; dog", "the man on the left ; car", "bus"]
H, W = 90, 120


def classes(prompt: str) -> set[str]:
    return {c.strip() for c in prompt.split(";")}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Image.Image]:
    folder = tmp_path_factory.mktemp("client-labels")
    sizes = [(96, 72), (150, 110), (80, 120)]
    return [Image.open(write_image(folder / f"img{i}.png", w, h, seed=30 + i)).convert("RGB")
            for i, (w, h) in enumerate(sizes)]


def test_labels_from_prompt_equals_library(server, segmenter, pictures):
    local = segmenter.segment(pictures, PROMPTS, labels_from_prompt=True)
    with RemoteSegmenter(server.url) as remote:
        remote_results = remote.segment(pictures, PROMPTS, labels_from_prompt=True)
        unrestricted = remote.segment(pictures, PROMPTS)
        detected = remote.detect(pictures, PROMPTS, labels_from_prompt=True)
    assert_same_results(remote_results, local)
    assert_same_results(detected, segmenter.detect(pictures, PROMPTS, labels_from_prompt=True))
    for prompt, result in zip(PROMPTS, remote_results):
        labels = {o.label for o in result.objects}
        assert labels and labels <= classes(prompt), result.text
    # Off, the random demo model writes other labels: the option did travel.
    assert any(not {o.label for o in r.objects} <= classes(p) for p, r in zip(PROMPTS, unrestricted))


def test_async_labels_from_prompt_equals_library(server, segmenter, pictures):
    async def main():
        async with AsyncRemoteSegmenter(server.url) as remote:
            return await remote.segment(pictures, PROMPTS, labels_from_prompt=True)

    assert_same_results(asyncio.run(main()), segmenter.segment(pictures, PROMPTS, labels_from_prompt=True))


def test_the_field_is_sent_only_when_true():
    from segmentation.client import request_body

    assert "labels_from_prompt" not in request_body(b"x", "cat", None, "segment")
    assert request_body(b"x", "cat", None, "segment", labels_from_prompt=True)["labels_from_prompt"] is True


# ---- encode ---------------------------------------------------------------------------------------


def ellipse() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return ((yy - 40) / 25) ** 2 + ((xx - 70) / 40) ** 2 <= 1


def rectangle() -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[5:30, 10:50] = True
    return mask


def two_blobs() -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[60:85, 5:25] = True
    mask[10:20, 90:115] = True
    return mask


@pytest.fixture(scope="module")
def encoder(tiny_fixtures) -> MaskEncoder:
    return MaskEncoder.from_npz(tiny_fixtures / "vae-oid.npz")


def png_bytes(mask: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, "PNG")
    return buffer.getvalue()


def test_encode_equals_local_encode_object(server, encoder, tmp_path):
    masks = {"bowl": ellipse(), "table": rectangle(), "pair of shoes": two_blobs()}
    with RemoteSegmenter(server.url) as remote:
        for label, mask in masks.items():
            expected = encode_object(encoder, mask, label)
            assert remote.encode(mask, label) == expected
            assert remote.encode(mask.astype(np.uint8), label) == expected
            path = tmp_path / "mask.png"
            path.write_bytes(png_bytes(mask))
            assert remote.encode(path, label) == remote.encode(png_bytes(mask), label) == expected
            assert remote.encode(encode_request_body(mask, label)["rle"], label) == expected
        box = (0.1, 0.2, 0.8, 0.95)
        assert remote.encode(ellipse(), "bowl", box) == encode_object(encoder, ellipse(), "bowl", box)
        full = remote.encoding(ellipse(), "bowl", box)
    assert full["locs"] == [102, 205, 818, 972] and full["label"] == "bowl"
    assert (full["height"], full["width"]) == (H, W) and len(full["codes"]) == 16
    # Different masks give different texts: equality above is not trivially true.
    assert len({encode_object(encoder, m, "x") for m in masks.values()}) == len(masks)


def test_async_encode_equals_local(server, encoder):
    masks = [ellipse(), rectangle(), two_blobs()] * 2

    async def main():
        async with AsyncRemoteSegmenter(server.url) as remote:
            return await asyncio.gather(*(remote.encode(m, "bowl") for m in masks))

    assert asyncio.run(main()) == [encode_object(encoder, m, "bowl") for m in masks]


@pytest.mark.parametrize(
    ("mask", "label", "box", "message"),
    [(np.zeros((8, 8), bool), "bowl", None, "empty"),
     (rectangle(), "a ; b", None, "';'"),
     (rectangle(), "bowl", (0.5, 0, 0.2, 1), "y1 < y2"),
     (b"not an image", "bowl", None, "mask: "),
     ({"size": [4, 4], "counts": [3, 5]}, "bowl", None, "sum to 8"),
     ({"size": "4x4", "counts": "abc"}, "bowl", None, "rle.size")],
)
def test_bad_input_is_rejected_with_the_servers_message(server, mask, label, box, message):
    with RemoteSegmenter(server.url, retries=0) as remote, pytest.raises(RequestRejected) as rejected:
        remote.encode(mask, label, box)
    assert rejected.value.status == 400 and message in rejected.value.message


def test_masks_the_client_cannot_send_are_refused_locally():
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        encode_request_body(np.zeros((4, 4, 3), bool), "bowl")
    with pytest.raises(TypeError, match="COCO RLE dict"):
        encode_request_body([[0, 1], [1, 0]], "bowl")
