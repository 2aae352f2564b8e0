"""The public API's field limits (inputs.py) agree with the checks behind them, and /docs.json (openapi.py)
states them for JSON and multipart bodies."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as coco_mask
from pydantic import ValidationError

from segmentation.model.prompts import PromptError, parse_prompt
from segmentation.model.targets import compressed_rle_counts
from segmentation.serving.bento import input_model
from segmentation.serving.inputs import RequestFields, prompt_pattern
from segmentation.serving.openapi import complete_openapi, route_docs, to_openapi30
from segmentation.serving.settings import Settings

SETTINGS = Settings(max_classes=4, max_prompt_chars=60, max_batch_images=3)
F = RequestFields(SETTINGS)


def _only_unicode_category_refusals(text: str) -> bool:
    """Characters the pattern leaves to the API: format, surrogate, private-use and unassigned code points."""
    return any(unicodedata.category(c) in ("Cf", "Cs", "Co", "Cn") for c in text)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(["cat", " ", ";", "segment", "Detect", "\t", "<", ">", "\n", "é", "\x85", "dog"]),
             max_size=12).map("".join),
))
def test_the_prompt_pattern_is_parse_prompt(text):
    """What the schema accepts is what parse_prompt accepts (but for the Unicode categories above)."""
    schema_ok = re.match(prompt_pattern(SETTINGS.max_classes), text) is not None and 1 <= len(text) <= 60
    try:
        parse_prompt(text, "segment", max_chars=60, max_classes=SETTINGS.max_classes)
        parsed_ok = True
    except PromptError:
        parsed_ok = False
    if _only_unicode_category_refusals(text) or text.endswith("\n"):
        assert parsed_ok <= schema_ok  # the API may refuse more, never less
    elif text.count(";") >= SETTINGS.max_classes and parsed_ok:
        assert not schema_ok  # the schema counts ';'-separated parts, empty ones too: stricter, and stated
    else:
        assert schema_ok == parsed_ok, (text, schema_ok, parsed_ok)


def segment(self, *, image: Path = None, image_url: F.ImageUrl = None, image_base64: F.ImageBase64 = None,  # noqa: RUF013
            prompt: F.Prompt, mask_format: F.MaskFormat = "rle", flag: F.Flag = False) -> dict: ...


def encode(self, mask: Path = None, rle: F.Rle = None, polygons: F.Polygons = None, width: F.Side = None,  # noqa: RUF013
           height: F.Side = None, box: F.Box = None, label: F.Label = "") -> dict: ...


def batch(self, requests: F.BatchEntries) -> list[dict]: ...


SEGMENT = input_model(segment, one_of=("image", "image_url", "image_base64"), noun="image")
ENCODE = input_model(encode, one_of=("mask", "rle", "polygons"), requires={"polygons": ("width", "height")},
                     noun="mask")
BATCH = input_model(batch)


@pytest.mark.parametrize(("model", "body", "words"), [
    (SEGMENT, {"prompt": "cat"}, "no image was sent"),
    (SEGMENT, {"prompt": "cat", "image_url": "http://a/x.png", "image_base64": "AAAA"}, "2 images were sent"),
    (SEGMENT, {"prompt": "cat", "image_url": "ftp://a"}, "pattern"),
    (SEGMENT, {"prompt": "cat", "image_url": "http://a/x.png", "flag": "true"}, "valid boolean"),
    (SEGMENT, {"prompt": "cat", "image_url": "http://a/x.png", "mask_format": "jpeg"}, "'rle'"),
    (ENCODE, {"polygons": [[0, 0, 1, 0, 1, 1]]}, "polygons needs width and height"),
    (ENCODE, {"rle": {"size": [2, 2], "counts": [4]}, "box": [0, 0, 1]}, "at least 4 items"),
    (ENCODE, {"rle": {"size": [2, 2], "counts": [4]}, "box": [0, 0, 1, "1"]}, "must be a JSON number"),
    (ENCODE, {"rle": {"size": [2, 2], "counts": [4]}, "width": "3"}, "must be a JSON number"),
    (ENCODE, {"rle": {"size": [2, 2], "counts": [4], "extra": 1}}, "Extra inputs"),
    (ENCODE, {"rle": {"size": [2, 2], "counts": [4]}, "label": "a;b"}, "pattern"),
    (BATCH, {"requests": []}, "at least 1 item"),
    (BATCH, {"requests": [{"prompt": "a", "image_url": "http://a/b"}] * 4}, "at most 3 items"),
    (BATCH, {"requests": [{"prompt": "a"}]}, "no image was sent"),
])
def test_the_input_models_refuse_what_the_schema_refuses(model, body, words):
    with pytest.raises(ValidationError) as refused:
        model.model_validate_json(json.dumps(body))
    assert words in str(refused.value)


def test_valid_bodies_pass():
    SEGMENT.model_validate_json('{"prompt": "cat ; dog", "image_url": "https://a/b.png", "image_base64": null}')
    ENCODE.model_validate_json('{"polygons": [[0, 0, 5, 0, 5, 5.5]], "width": 8, "height": 8.0, "box": [0, 0, 1, 1]}')
    BATCH.model_validate_json('{"requests": [{"prompt": "a", "image_base64": "AAAA", "task": "detect"}]}')


@settings(max_examples=150, deadline=None, database=None)
@given(st.integers(1, 40), st.integers(1, 40), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_compressed_rle_counts_read_pycocotools_strings(height, width, fill, seed):
    mask = np.random.default_rng(seed).random((height, width)) < fill
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    runs = compressed_rle_counts(rle["counts"].decode())
    assert sum(runs) == height * width
    decoded = coco_mask.decode(coco_mask.frPyObjects({"size": [height, width], "counts": runs}, height, width))
    assert (decoded.astype(bool) == mask).all()


@pytest.mark.parametrize("counts", ["0`h", "\x7f", " "])
def test_malformed_compressed_counts(counts):
    assert compressed_rle_counts(counts) is None


def test_openapi30_conversion():
    assert to_openapi30({"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}], "default": None}) == {
        "type": "string", "maxLength": 3, "default": None, "nullable": True}
    assert to_openapi30({"type": "file", "examples": ["a"], "const": 1, "ge": 1}) == {
        "type": "string", "format": "binary", "example": "a", "enum": [1]}


@pytest.fixture(scope="module")
def document():
    base = {"openapi": "3.0.2", "info": {"title": "t", "version": "1"}, "paths": {
        route: {"post": {"responses": {"200": {"description": "ok"}}}} for route in ("/segment", "/encode", "/batch")}
        | {"/readyz": {"get": {"responses": {"200": {"description": "ok"}}}}}}
    return complete_openapi(base, route_docs({"/segment": SEGMENT, "/encode": ENCODE, "/batch": BATCH}),
                            api_keys=True)


def test_the_document_states_both_media_types_and_every_limit(document):
    content = document["paths"]["/segment"]["post"]["requestBody"]["content"]
    as_json, as_form = content["application/json"]["schema"], content["multipart/form-data"]["schema"]
    assert "image" not in as_json["properties"] and as_form["properties"]["image"]["format"] == "binary"
    assert [b["required"] for b in as_json["oneOf"]] == [["image_url"], ["image_base64"]]
    assert [b["required"] for b in as_form["oneOf"]] == [["image"], ["image_url"], ["image_base64"]]
    prompt = as_json["properties"]["prompt"]
    assert (prompt["minLength"], prompt["maxLength"], as_json["required"]) == (1, 60, ["prompt"])
    assert as_json["properties"]["image_url"]["nullable"] is True
    assert as_form["properties"]["image_base64"]["maxLength"] < as_json["properties"]["image_base64"]["maxLength"]
    assert content["multipart/form-data"]["encoding"]["image"]["contentType"].startswith("image/png")
    encode = document["paths"]["/encode"]["post"]["requestBody"]["content"]
    assert encode["multipart/form-data"]["encoding"]["polygons"] == {"contentType": "application/json"}
    polygons = [b for b in encode["application/json"]["schema"]["oneOf"] if "polygons" in b["required"]]
    assert polygons[0]["required"] == ["polygons", "width", "height"]
    box = encode["application/json"]["schema"]["properties"]["box"]
    assert (box["minItems"], box["maxItems"], box["items"]["minimum"], box["items"]["maximum"]) == (4, 4, 0, 1)
    requests = document["paths"]["/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert (requests["properties"]["requests"]["minItems"], requests["properties"]["requests"]["maxItems"]) == (1, 3)
    assert not _keys(document) & {"ge", "le", "const", "examples", "$defs"}  # not OpenAPI 3.0 keywords


def _keys(node) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)} - {"properties"} | {
            k for v in node.get("properties", {}).values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def test_the_document_lists_every_error_answer(document):
    responses = document["paths"]["/segment"]["post"]["responses"]
    assert {"200", "400", "401", "405", "413", "415", "429", "500", "503", "504"} <= set(responses)
    assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert "503" in document["paths"]["/readyz"]["get"]["responses"]
    error = document["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"error", "detail", "kind", "request_id"}


def test_schemathesis_reads_the_document(document):
    import schemathesis

    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(o.method.upper(), o.path) for o in operations} >= {("POST", "/segment"), ("POST", "/encode")}
