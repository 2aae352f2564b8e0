"""The HTTP API's request checks and the /encode answer, kept apart from BentoML so they test alone.

Every client mistake becomes a `RequestError` carrying the status to answer and a message saying
what was wrong and what is accepted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..model.bodies import MASK_FORMATS, object_body, response_body
from ..model.images import ACCEPTED_FORMATS, ImageError, ImageTooLarge, open_image
from ..model.predictions import Prediction, assemble
from ..model.prompts import Prompt, PromptError, Task, parse_prompt
from ..model.targets import TargetError, encode_object, segmentation_mask
from ..model.tokens import parse_objects
from . import errors
from .fetch import FetchError, UrlPolicy, fetch_image
from .settings import Settings


class RequestError(ValueError):
    """A request that cannot be answered: the HTTP status, a message for the client (no exception
    texts, reprs or paths: those belong in the log), and for a transient failure (503, 429) the
    seconds after which a retry may succeed."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def engine_refusal(message: str, status: int) -> RequestError:
    """The engine's refusal of a request for the client: its 4xx say what was wrong; its 5xx carry
    internals (exception texts), which go to the log under the request id instead."""
    if status < 500:
        return RequestError(message, status)
    errors.logger.warning("request %s: the model engine answered %d: %s", errors.current_request_id(),
                          status, message)
    if status == 504:
        return RequestError("the model engine did not finish this request in time; retry later", 504)
    return RequestError("the model engine could not answer this request (overloaded or failing); "
                        "retry shortly", 503, retry_after=1)


def check_mask_format(value: str | None) -> str:
    fmt = (value or "rle").strip().lower()
    if fmt not in MASK_FORMATS:
        raise RequestError(f"mask_format {quoted(value)} is not supported; accepted: {', '.join(MASK_FORMATS)}")
    return fmt


def check_model(value: str | None, served: list[str], unknown_status: int = 400) -> str:
    """The served model a request names (default: the first); never a path or hub id to load. A name not
    served is answered `unknown_status` (404 where adapters load and unload while serving)."""
    if value is None or value == "":
        return served[0]
    if value not in served:
        raise RequestError(f"unknown model {quoted(value)}; served models: {', '.join(served)}", unknown_status)
    return value


def check_prompt(prompt: str | None, task: Task, settings: Settings, *, labels_from_prompt: bool = False) -> Prompt:
    """The request's prompt; `labels_from_prompt` restricts labels to its classes (see `Prompt`)."""
    try:
        parsed = parse_prompt(
            prompt if prompt is not None else "", task,
            max_chars=settings.max_prompt_chars, max_classes=settings.max_classes,
        )
    except PromptError as exc:
        raise RequestError(str(exc)) from exc
    return dataclasses.replace(parsed, labels_from_prompt=bool(labels_from_prompt))


def quoted(value) -> str:
    """A client's value quoted for a message (JSON's quoting, never a Python repr), cut at 100 chars."""
    text = json.dumps(value if isinstance(value, str | int | float | bool) or value is None else str(value),
                      ensure_ascii=False)
    return text if len(text) <= 100 else text[:97] + '..."'


async def read_image_bytes(
    settings: Settings,
    upload: Path | None = None,
    image_url: str | None = None,
    image_base64: str | None = None,
) -> bytes:
    """The request's image file from exactly one of: a multipart upload, a URL, base64 data."""
    given = [name for name, v in (("image", upload), ("image_url", image_url), ("image_base64", image_base64)) if v]
    if len(given) != 1:
        what = "no image was sent" if not given else f"{len(given)} images were sent ({', '.join(given)})"
        raise RequestError(
            f"{what}; send exactly one of: 'image' (multipart file upload), 'image_url' (http/https URL) "
            "or 'image_base64' (base64-encoded image bytes, optionally a data: URL)"
        )
    if upload:
        size = Path(upload).stat().st_size
        if size > settings.max_image_bytes:
            raise RequestError(f"the upload is {size} bytes; the limit is {settings.max_image_bytes}", 413)
        return await asyncio.to_thread(Path(upload).read_bytes)
    if image_url:
        policy = UrlPolicy(settings.max_image_bytes, settings.fetch_timeout_s, settings.url_allowlist)
        try:
            return await fetch_image(image_url, policy)
        except FetchError as exc:
            raise RequestError(str(exc), exc.status) from exc
    return await asyncio.to_thread(decode_base64, image_base64, settings.max_image_bytes)


def image_pixels(data: bytes, max_pixels: int) -> int:
    """Width x height from the image's header alone (no pixels decoded); RequestError for bytes that
    are no accepted image or an image over `max_pixels`."""
    if not data:
        raise RequestError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        raise RequestError(f"the image has more than {max_pixels} pixels, the limit", 413) from None
    except Exception:  # Pillow raises many kinds for bytes that are no image
        raise RequestError(f"the data is not a readable image; accepted formats: {', '.join(ACCEPTED_FORMATS)}") \
            from None
    if width * height > max_pixels:
        raise RequestError(f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}", 413)
    return width * height


async def decode_image(settings: Settings, data: bytes) -> Image.Image:
    """The upright RGB image (decoding is CPU work: off the event loop)."""
    try:
        return await asyncio.to_thread(open_image, data, max_pixels=settings.max_pixels)
    except ImageTooLarge as exc:
        raise RequestError(str(exc), 413) from exc
    except ImageError as exc:
        raise RequestError(str(exc)) from exc


async def read_image(
    settings: Settings,
    upload: Path | None = None,
    image_url: str | None = None,
    image_base64: str | None = None,
) -> Image.Image:
    """The request's image from exactly one of: a multipart upload, a URL, base64 data."""
    return await decode_image(settings, await read_image_bytes(settings, upload, image_url, image_base64))


def answer_body(prediction: Prediction, width: int, height: int, *, model: str, mask_format: str,
                input_image: Image.Image | None = None) -> dict:
    """The JSON answer of /segment and /detect, made one object at a time: each full-size mask is
    pasted, encoded and dropped before the next (the same body as `response_body(assemble(...))`)."""
    objects = []
    for obj in prediction.objects:
        placed = assemble(dataclasses.replace(prediction, objects=[obj]), width, height)
        objects += [object_body(o, mask_format) for o in placed.objects]
        del placed
    body = response_body(assemble(dataclasses.replace(prediction, objects=[]), width, height),
                         model=model, mask_format=mask_format, input_image=input_image)
    body["objects"] = objects
    return body


def decode_base64(value: str, max_bytes: int, field: str = "image_base64") -> bytes:
    if not isinstance(value, str):
        raise RequestError(f"{field} must be a string")
    if value.startswith("data:"):
        value = value.partition(",")[2]  # data:image/png;base64,....
    if len(value) * 3 // 4 > max_bytes:
        raise RequestError(f"{field} decodes to more than the limit of {max_bytes} bytes", 413)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field} is not valid base64 (the standard alphabet A-Z, a-z, 0-9, '+', '/' with "
                           "'=' padding, no line breaks)") from None


# ---- POST /encode: a user's mask and label to PaliGemma's training text ---------------------------------

# A polygon is rasterized along its outline, pixel by pixel: bound the outline's length.
MAX_POLYGON_OUTLINE = 4_000_000


def _check_polygons(polygons: list, width: int, height: int) -> None:
    outline = 0.0
    for index, polygon in enumerate(polygons):
        if len(polygon) % 2:
            raise RequestError(f"polygons[{index}] has an odd count of numbers; give x, y pairs")
        xs, ys = polygon[0::2], polygon[1::2]
        if not (all(0 <= x <= width for x in xs) and all(0 <= y <= height for y in ys)):
            raise RequestError(f"polygons[{index}] has a point outside the {width}x{height} image "
                               "(0 <= x <= width, 0 <= y <= height)")
        outline += sum(max(abs(xs[i] - xs[i - 1]), abs(ys[i] - ys[i - 1])) for i in range(len(xs)))
    if outline > MAX_POLYGON_OUTLINE:
        raise RequestError(f"the polygons' outlines are {outline:.0f} pixels long; the limit is "
                           f"{MAX_POLYGON_OUTLINE}", 413)


def mask_source(
    settings: Settings,
    upload: Path | None = None,
    mask_base64: str | None = None,
    rle=None,
    polygons: list | None = None,
    width: int | None = None,
    height: int | None = None,
) -> tuple[int, Callable[[], np.ndarray]]:
    """The request's mask, checked but not yet made: (its pixels, a function making the bool `[H, W]`
    mask) from exactly one of: an uploaded image file (PNG or any accepted format; nonzero pixels are
    the object), base64 image bytes, a COCO RLE, or polygons with the image's `width` and `height`."""
    if rle is not None and hasattr(rle, "as_dict"):
        rle = rle.as_dict()
    given = [name for name, v in (("mask", upload), ("mask_base64", mask_base64), ("rle", rle),
                                  ("polygons", polygons)) if v]
    if len(given) != 1:
        what = "no mask was sent" if not given else f"{len(given)} masks were sent ({', '.join(given)})"
        raise RequestError(
            f"{what}; send exactly one of: 'mask' (an image file upload, nonzero = object), 'mask_base64' "
            "(the image bytes in base64), 'rle' (COCO RLE {\"size\": [h, w], \"counts\": ...}) or 'polygons' "
            "([[x0, y0, x1, y1, ...], ...] with 'width' and 'height')"
        )
    if upload or mask_base64:
        if upload:
            size = Path(upload).stat().st_size
            if size > settings.max_image_bytes:
                raise RequestError(f"the upload is {size} bytes; the limit is {settings.max_image_bytes}", 413)
            data = Path(upload).read_bytes()
        else:
            data = decode_base64(mask_base64, settings.max_image_bytes, field="mask_base64")
        try:
            pixels = image_pixels(data, settings.max_pixels)
        except RequestError as exc:
            raise RequestError(f"mask: {exc}", exc.status) from None

        def from_image() -> np.ndarray:
            try:
                image = open_image(data, max_pixels=settings.max_pixels)
            except ImageTooLarge as exc:
                raise RequestError(str(exc), 413) from exc
            except ImageError as exc:
                raise RequestError(f"mask: {exc}") from exc
            return np.asarray(image.convert("L")) > 0

        return pixels, from_image
    if rle:
        size = rle.get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise RequestError("rle.size must be [height, width] (two positive integers)")
        height, width = size
    elif not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise RequestError("polygons need the image's 'width' and 'height' (positive integers)")
    if width * height > settings.max_pixels:
        raise RequestError(f"the mask is {width}x{height} pixels; the limit is {settings.max_pixels}", 413)
    if polygons:
        _check_polygons(polygons, width, height)

    def from_coco() -> np.ndarray:
        try:
            return segmentation_mask(rle or polygons, height, width)
        except ValueError as exc:  # segmentation_mask's own messages: what is malformed
            raise RequestError(f"{given[0]}: {exc}") from exc
        except Exception as exc:
            raise RequestError(f"{given[0]} could not be read as a COCO mask") from exc

    return width * height, from_coco


def read_mask(settings: Settings, upload: Path | None = None, mask_base64: str | None = None, rle=None,
              polygons: list | None = None, width: int | None = None, height: int | None = None) -> np.ndarray:
    """The request's bool `[H, W]` mask (see `mask_source`)."""
    return mask_source(settings, upload, mask_base64, rle, polygons, width, height)[1]()


def encode_body(encoder, mask: np.ndarray, label: str | None, box: list[float] | None) -> dict:
    """The answer of /encode: the object's text and its parts (see `segmentation.model.targets`)."""

    try:
        text = encode_object(encoder, mask, label or "", box)
    except TargetError as exc:
        raise RequestError(str(exc)) from exc
    [obj] = parse_objects(text)
    return {"text": text, "locs": list(obj.locs), "codes": list(obj.codes), "label": obj.label,
            "height": int(mask.shape[0]), "width": int(mask.shape[1])}
