"""Schemathesis hooks for the schema fuzzing test (loaded through SCHEMATHESIS_HOOKS).

- Real images where the document asks for one: the `base64-image` format (image_base64, mask_base64)
  and upload parts declared as image/png or image/jpeg get small random PNG/JPEG files, so schema-valid
  requests mostly reach the model instead of stopping at "not an image".
- `positive_data_acceptance_or_unusable`: schemathesis' `positive_data_acceptance`, except that an
  error with kind `unusable_input` passes. The document describes that kind under 400/413/415: a
  request valid by the schema whose content cannot be used (bytes that are no image, a refused URL,
  an unknown model, an empty mask, a box out of order). Every other 4xx to a schema-valid request is
  still a failure: what the schema can express, pydantic refuses first with kind `invalid_request`.
  Two kinds of case are skipped: a form text value that is a JSON string literal (the document says
  such a part is decoded once, as BentoML's client JSON-encodes every part, while schemathesis means
  the quotes), and a case labelled positive whose body breaks the document's own schema (schemathesis
  4.32's coverage phase makes those for multipart bodies with a `oneOf` beside a file).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.specs.openapi.checks import positive_data_acceptance


def _image_bytes(seed: int, width: int, height: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def images(fmt: str) -> st.SearchStrategy[bytes]:
    return st.builds(_image_bytes, st.integers(0, 2**16), st.integers(1, 48), st.integers(1, 48), st.just(fmt))


BASE64_IMAGES = (images("PNG") | images("JPEG")).map(lambda data: base64.b64encode(data).decode())
schemathesis.openapi.format("base64-image", BASE64_IMAGES)
schemathesis.openapi.media_type("image/png", images("PNG"))
schemathesis.openapi.media_type("image/jpeg", images("JPEG"))


def _json_string_in_form(case) -> bool:
    """A form field whose text is a JSON string literal (`"cat"`): the document says such a part is decoded
    (BentoML's client JSON-encodes every part), while schemathesis means the text with its quotes."""
    if case.media_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return False
    for value in (case.body or {}).values() if isinstance(case.body, dict) else ():
        if isinstance(value, str) and value.startswith('"'):
            try:
                if isinstance(json.loads(value), str):
                    return True
            except ValueError:
                pass
    return False


def _breaks_its_own_schema(case) -> bool:
    """A case generated as positive whose body the document's schema refuses. Schemathesis 4.32's coverage
    phase makes such cases for multipart bodies with `oneOf` beside a file (it drops constraints when it
    cannot build a template, e.g. an empty required `prompt`): not positive data, whatever it is labelled."""
    body = getattr(case, "body", None)
    alternative = case.operation.get_body_for_media_type(case.media_type) if case.media_type else None
    if not isinstance(body, dict) or alternative is None:
        return False
    plain = {k: v if v is None or isinstance(v, str | int | float | bool | list | dict) else "file"
             for k, v in body.items()}
    try:
        return not alternative.is_valid(plain)
    except Exception:
        return False


@schemathesis.check
def positive_data_acceptance_or_unusable(ctx, response, case):
    """`positive_data_acceptance`, with answers of kind `unusable_input` accepted (see the module docstring)."""
    if _json_string_in_form(case) or _breaks_its_own_schema(case):
        return None
    if 400 <= response.status_code < 500:
        try:
            body = response.json()
        except Exception:
            body = None
        if isinstance(body, dict) and body.get("kind") == "unusable_input":
            return None
    return positive_data_acceptance(ctx, response, case)
