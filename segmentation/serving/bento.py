"""The BentoML side of request handling: the engine's item types, the strict-API decorator (the public
request models; their fields are in `inputs.py`), the error answer, and the refusal of BentoML's own
URL downloads.

`service.py` imports these so that it stays glue: services, routes and the order of the calls.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import io
import typing
from typing import Annotated, Any, Literal

import _bentoml_impl.serde as _bentoml_serde
import bentoml
from PIL import Image
from pydantic import ConfigDict, Field, create_model, field_serializer, field_validator
from starlette.responses import JSONResponse

from ..model.images import MAX_MODEL_SIDE
from . import api
from .errors import UNUSABLE_INPUT, kind_for
from .inputs import INPUT_CONFIG, one_of_schema
from .inputs import one_of as one_of_validator


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


class StrictInput(bentoml.IODescriptor):
    """The base of the public API's input models: unknown fields refused, patterns read by Python's `re`."""

    model_config = INPUT_CONFIG


def input_model(func, *, one_of: tuple[str, ...] = (), requires: dict[str, tuple[str, ...]] | None = None,
                noun: str = "value"):
    """The input model of an API method: one field per parameter after `self`, its annotation (with the
    `Field` limits of `inputs.py`) and default; a parameter without a default is required."""
    hints = typing.get_type_hints(func, include_extras=True)
    fields = {}
    for param in list(inspect.signature(func).parameters.values())[1:]:
        default = Field() if param.default is param.empty else param.default
        fields[param.name] = (hints.get(param.name, typing.Any), default)
    base, validators = StrictInput, {}
    if one_of:
        validators = {"one_of": one_of_validator(*one_of, requires=requires, noun=noun)}
        base = type("OneOfInput", (StrictInput,), {
            "model_config": ConfigDict(**INPUT_CONFIG, json_schema_extra=one_of_schema(one_of, requires)),
            "__module__": __name__,
        })
    return create_model(f"{func.__name__.title()}Input", __module__=func.__module__, __base__=base,
                        __validators__=validators, **fields)


def strict_api(*, one_of: tuple[str, ...] = (), requires: dict[str, tuple[str, ...]] | None = None,
               noun: str = "value", **options):
    """`bentoml.api` whose request body may hold only the method's own fields, checked as the method's
    `Annotated[..., Field(...)]` parameters say (see `input_model`).

    BentoML silently ignores unknown fields, so a typo such as `mask-format` would be answered as if
    the field were absent; this answers 400 naming the field instead. `one_of`: fields of which
    exactly one must hold a value (the image sources); `requires`: what one of them needs beside it.
    """

    def decorate(func):
        spec = input_model(func, one_of=one_of, requires=requires, noun=noun)
        return bentoml.api(input_spec=spec, **options)(func)

    return decorate


async def answer(work):
    """The API's answer, or a 4xx/5xx JSON error for a RequestError (an unavailable or overloaded
    engine's 503 or 429 says when to retry: `Retry-After`). A client's 4xx here is about what its
    valid request holds (kind `unusable_input`): the schema was checked before the API ran."""
    try:
        return await work
    except api.RequestError as exc:
        kind = UNUSABLE_INPUT if exc.status < 500 else None
        return error_response(str(exc), exc.status, retry_after=exc.retry_after, kind=kind)


def error_response(message: str, status: int = 400, retry_after: int | None = None,
                   kind: str | None = None) -> JSONResponse:
    """The one error shape (`ErrorAnswers` adds the request id)."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message, "detail": message, "kind": kind or kind_for(status)},
                        status_code=status, headers=headers)
