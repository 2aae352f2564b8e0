import json

import pytest

from segmentation.serving.guard import normalize_error_body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([{"error": "bad image"}], "bad image"),
        ({"error": "1 validation error", "detail": [{"loc": ["body", "prompt"], "msg": "Input should be a valid string",
                                                     "type": "string_type"}]},
         "invalid request: prompt: Input should be a valid string"),
        ({"error": "x", "detail": [{"loc": ["mask-format"], "msg": "Extra inputs are not permitted"},
                                   {"loc": ["requests", 0, "task"], "msg": "String should match pattern"}]},
         "invalid request: mask-format: Extra inputs are not permitted; requests.0.task: String should match pattern"),
    ],
)
def test_error_bodies_get_one_shape(body, message):
    out = json.loads(normalize_error_body(json.dumps(body).encode()))
    assert out == {"error": message, "detail": message}


@pytest.mark.parametrize("body", [b'{"error": "fine already"}', b"not json", b'{"error": "x", "detail": "text"}'])
def test_good_or_foreign_bodies_are_left_alone(body):
    assert normalize_error_body(body) is None
