"""The BentoML side of request handling: the engine's item types, the public request models, the
strict-API decorator, the error answer, and the refusal of BentoML's own URL downloads.

`service.py` imports these so that it stays glue: services, routes and the order of the calls.
"""

from __future__ import annotations

import base64
import contextlib
import io
from typing import Annotated, Any, Literal

import _bentoml_impl.serde as _bentoml_serde
import bentoml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator
from starlette.responses import JSONResponse

from ..model.images import MAX_MODEL_SIDE
from . import api


@contextlib.contextmanager
def _refuse_bentoml_downloads():
    raise bentoml.exceptions.BadInput(
        "a URL was sent in place of the image file; send the file itself as 'image', "
        "or the URL as 'image_url' (which is checked against the server's URL policy)"
    )
    yield  # pragma: no cover


def refuse_bentoml_downloads() -> None:
    """BentoML downloads a URL itself when one arrives where a file is expected (a multipart text part
    named `image`, or a JSON body that is a bare URL), before any API code runs: a way around the URL
    policy of `image_url`. Every such download goes through one context manager; refuse them all."""
    _bentoml_serde.make_safe_connect = _refuse_bentoml_downloads


# What an engine item may hold at most, whatever the server's own limits (checked again per item by the
# model pool, segmentation/serving/pool.py): enough for any served model, small enough to parse safely.
MAX_ITEM_CLASSES = 256
MAX_ITEM_TEXT = 10_000
MAX_ITEM_TOKENS = 100_000


class EngineItem(bentoml.IODescriptor):
    """One image for the engine: the picture already resized to the model's input size.

    It travels as JSON, the picture as base64 of an uncompressed PPM: exact pixels, written and read in
    about a millisecond (PNG costs ~75 ms at 448 px), so every engine sees the very picture the public
    tier made. The engine reads nothing else (never a pickle: trust.py), and refuses pictures that are not
    a PPM of at most MAX_MODEL_SIDE pixels a side before decoding their pixels.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    image: Image.Image
    task: Literal["segment", "detect"]
    classes: list[Annotated[str, Field(min_length=1, max_length=MAX_ITEM_TEXT)]] = Field(
        min_length=1, max_length=MAX_ITEM_CLASSES)
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_ITEM_TOKENS)
    labels_from_prompt: bool = False
    cut_after: int | None = Field(None, ge=1, le=MAX_ITEM_TOKENS)  # OpenAI's max_tokens (pool.PredictRequest)

    @field_serializer("image", when_used="json")
    def _image_as_base64(self, image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PPM")
        return base64.b64encode(buffer.getvalue()).decode()

    @field_validator("image", mode="before")
    @classmethod
    def _image_from_base64(cls, value):
        """A JSON item's picture (base64 of a PPM) as a loaded RGB image; a picture made in this process
        (tests, benchmarks) as it is."""
        if isinstance(value, Image.Image):
            return value
        if not isinstance(value, str):
            raise ValueError("image must be base64 text of a PPM picture")
        if len(value) > (MAX_MODEL_SIDE**2 * 3 + 64) * 4 // 3 + 4:
            raise ValueError(f"image is larger than a {MAX_MODEL_SIDE} px square PPM")
        try:
            picture = Image.open(io.BytesIO(base64.b64decode(value, validate=True)), formats=["PPM"])
        except Exception as exc:  # bad base64, not a PPM, a decompression bomb's header: all the caller's
            raise ValueError("image must be base64 text of a PPM picture") from exc
        if max(picture.size) > MAX_MODEL_SIDE or picture.mode != "RGB":
            raise ValueError(f"image must be an RGB picture of at most {MAX_MODEL_SIDE} px a side")
        try:
            picture.load()
        except Exception as exc:
            raise ValueError("image is a truncated or corrupt PPM picture") from exc
        return picture


class EngineOutcome(bentoml.IODescriptor):
    prediction: dict[str, Any] | None = None  # segmentation.model.predictions.Prediction.to_dict()
    error: str | None = None
    status: int = 200


def predict_requests(items: list[EngineItem]) -> list:
    """The engine's items as the model pool's requests (imported in the engine process only: torch)."""
    from ..model.prompts import Prompt
    from .pool import PredictRequest

    return [
        PredictRequest(
            item.model, item.image, Prompt(item.task, tuple(item.classes), item.labels_from_prompt),
            item.max_new_tokens, item.cut_after,
        )
        for item in items
    ]


def engine_outcome(outcome) -> EngineOutcome:
    """A pool outcome as the engine answers it (the prediction as a plain dict: it is pickled)."""
    return EngineOutcome(
        prediction=outcome.prediction.to_dict() if outcome.prediction else None,
        error=outcome.error,
        status=outcome.status,
    )


class BatchEntry(BaseModel):
    """One image of a /segment_batch request (uploads go to /segment)."""

    model_config = ConfigDict(extra="forbid")

    image_url: str | None = None
    image_base64: str | None = None
    prompt: str = ""
    model: str | None = None
    mask_format: str = "rle"
    task: str = Field("segment", pattern="^(segment|detect)$")
    labels_from_prompt: bool = False


def strict_api(**options):
    """`bentoml.api` whose request body may hold only the method's own fields.

    BentoML silently ignores unknown fields, so a typo such as `mask-format` would be answered as if
    the field were absent; this answers 400 naming the field instead.
    """

    def decorate(func):
        inferred = bentoml.IODescriptor.from_input(func, skip_self=True)
        strict = type(f"{func.__name__.title()}Input", (inferred,), {
            "model_config": ConfigDict(**{**inferred.model_config, "extra": "forbid"}),
            "__module__": func.__module__,
        })
        return bentoml.api(input_spec=strict, **options)(func)

    return decorate


async def answer(work):
    """The API's answer, or a 4xx/5xx JSON error `{"error": message}` for a RequestError (an
    unavailable or overloaded engine's 503 or 429 says when to retry: `Retry-After`)."""
    try:
        return await work
    except api.RequestError as exc:
        return error_response(str(exc), exc.status, retry_after=exc.retry_after)


def error_response(message: str, status: int = 400, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)
