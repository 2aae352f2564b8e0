"""The public API's request fields, with every limit the server enforces stated where `/docs.json` shows it.

`RequestFields(settings)` holds one `Annotated` type per kind of field; `service.py` writes its API
signatures with them, so BentoML's input models (and the OpenAPI document made from them) carry the
limits, and pydantic refuses a request that breaks one (400, kind `invalid_request`) before the API
runs. Checks that no schema can state stay in the API (400/413, kind `unusable_input`): whether an
image decodes and its pixel count, whether a URL may be fetched and answers, whether a model is
served, control or unassigned characters in a prompt, a box's order, a mask's content.

Scalars are strict where pydantic would otherwise coerce what the schema forbids (`"true"` for a
boolean, `"3"` for a number); numbers also refuse NaN and infinities. Patterns use Python's `re`
(the input models set `regex_engine="python-re"`), which schemathesis uses too.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ..model.bodies import MASK_FORMATS
from ..model.prompts import TASKS
from .settings import Settings

MaskFormat = Literal[MASK_FORMATS]  # type: ignore[valid-type]
TaskName = Literal[TASKS]  # type: ignore[valid-type]

MAX_URL_CHARS = 2048
MAX_MODEL_CHARS = 256
DATA_URL_PREFIX_CHARS = 256  # room for `data:image/png;base64,` before the base64 text
MAX_POLYGONS = 1000
MAX_POLYGON_NUMBERS = 20_000  # 10 000 points
# A format of our own (formats are open in OpenAPI): base64 of an image file, or a data: URL holding one.
BASE64_IMAGE = {"format": "base64-image"}
INPUT_CONFIG = ConfigDict(extra="forbid", regex_engine="python-re")

# A prompt's characters: no `<`/`>` (model tokens), no control characters but tab.
_PROMPT_CHAR = r"[^;<>\x00-\x08\x0a-\x1f\x7f-\x9f]"
# Not empty: something besides spaces and `;`, and besides a leading task word (`segment`, `detect`).
_NOT_EMPTY = r"(?![\s;]*$)(?!\s*(?:[sS][eE][gG][mM][eE][nN][tT]|[dD][eE][tT][eE][cC][tT])(?:\s[\s;]*)?$)"


def pattern_hints(settings: Settings) -> dict[str, str]:
    """What each pattern means, for the 400 that names a field whose value does not match it."""
    return {
        "prompt": f"must name 1 to {settings.max_classes} classes or phrases separated by ';' (not only a task "
                  "word), without '<', '>' or control characters",
        "label": "may not contain ';', '<' or line breaks",
        "image_url": "must be an http:// or https:// URL",
        "counts": "must be a COCO compressed RLE string (characters '0' to 'o')",
    }


def prompt_pattern(max_classes: int) -> str:
    """Classes separated by `;` (at most `max_classes` parts), not empty, no `<`, `>` or control chars."""
    return rf"^{_NOT_EMPTY}{_PROMPT_CHAR}*(?:;{_PROMPT_CHAR}*){{0,{max(0, max_classes - 1)}}}$"


def _json_number(value):
    """A number as JSON has it: not a string, not a boolean (pydantic's lax mode would take both)."""
    if isinstance(value, str | bool) or value is None:
        raise ValueError("must be a JSON number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def number(**limits):
    """A JSON number (float) within `limits` (pydantic's ge/le...)."""
    return Annotated[float, Field(allow_inf_nan=False, **limits), BeforeValidator(_json_number)]


def integer(**limits):
    """A JSON integer within `limits`; 3.0 counts as 3, as JSON Schema counts it."""
    return Annotated[int, Field(**limits), BeforeValidator(_json_number)]


Flag = Annotated[bool, Field(strict=True)]


def base64_chars(max_bytes: int) -> int:
    return 4 * math.ceil(max_bytes / 3) + DATA_URL_PREFIX_CHARS


class RequestFields:
    """The field types of the public API under `settings` (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        s = settings
        image_b64_chars = base64_chars(s.max_image_bytes)
        self.Prompt = Annotated[str, Field(
            min_length=1, max_length=s.max_prompt_chars, pattern=prompt_pattern(s.max_classes),
            description=f"What to find: classes or phrases separated by ';' (at most {s.max_classes}), e.g. "
                        f"'cat ; dog'; a leading task word is dropped; at most {s.max_prompt_chars} characters, "
                        "no '<', '>' or control characters (format, private-use and unassigned code points "
                        "are refused too: 400 with kind unusable_input)",
            examples=["cat ; dog"],
        )]
        self.ImageUrl = Annotated[str | None, Field(
            min_length=1, max_length=MAX_URL_CHARS, pattern=r"^[hH][tT][tT][pP][sS]?://",
            description="An http(s) URL of the image; only public hosts (unless the server allow-lists one), "
                        f"at most {s.max_image_bytes} bytes, an image content type. A URL the server refuses "
                        "or cannot download is a 400/413/415 with kind unusable_input.",
        )]
        self.ImageBase64 = Annotated[str | None, Field(
            min_length=1, max_length=image_b64_chars, json_schema_extra=BASE64_IMAGE,
            description=f"The image file's bytes in base64 (optionally a data: URL), at most {s.max_image_bytes} "
                        f"bytes decoded and {s.max_pixels} pixels; accepted formats PNG, JPEG, WEBP, GIF, BMP, "
                        "TIFF. Bytes that do not decode to such an image are a 400 (kind unusable_input).",
        )]
        self.Model = Annotated[str | None, Field(
            max_length=MAX_MODEL_CHARS,
            description="A served model or LoRA adapter id (POST /models lists them); empty or absent: the "
                        "default. An id the server does not serve is a 400 with kind unusable_input.",
        )]
        self.MaskFormat = Annotated[MaskFormat, Field(description="How masks are encoded in the answer")]
        self.Flag = Flag
        self.Label = Annotated[str, Field(
            max_length=s.max_prompt_chars, pattern=r"^[^;<\r\n]*$",
            description=f"The object's label (no ';', '<' or line breaks; at most {s.max_prompt_chars} characters)",
        )]
        self.Box = Annotated[list[number(ge=0.0, le=1.0)] | None, Field(
            min_length=4, max_length=4,
            description="The normalized box y1, x1, y2, x2, each in 0..1, with y1 < y2 and x1 < x2 (a box out of "
                        "order is a 400 with kind unusable_input); absent: the mask's tight box",
        )]
        self.Side = Annotated[integer(ge=1, le=s.max_pixels) | None, Field(
            default=None,
            description="The image's width or height in pixels (polygons need both); width x height may not "
                        f"exceed {s.max_pixels} pixels (413, kind unusable_input)",
        )]
        self.Polygons = Annotated[
            list[Annotated[list[number(ge=0.0, le=float(s.max_pixels))],
                           Field(min_length=6, max_length=MAX_POLYGON_NUMBERS)]] | None,
            Field(min_length=1, max_length=MAX_POLYGONS,
                  description="COCO polygons [[x0, y0, x1, y1, ...], ...] in pixels, within the image given by "
                              "'width' and 'height'; each an even count of numbers (an odd count, or a point "
                              "outside the image, is a 400 with kind unusable_input)"),
        ]
        self.MaskBase64 = Annotated[str | None, Field(
            min_length=1, max_length=image_b64_chars, json_schema_extra=BASE64_IMAGE,
            description=f"The mask image's bytes in base64 (nonzero pixels = the object), at most "
                        f"{s.max_image_bytes} bytes decoded",
        )]
        self.Rle = Annotated[Rle | None, Field(description="A COCO RLE of the mask")]
        self.BatchEntry = batch_entry_model(self)
        self.BatchEntries = Annotated[list[self.BatchEntry], Field(
            min_length=1, max_length=s.max_batch_images,
            description=f"1 to {s.max_batch_images} images, answered in order",
        )]


class Rle(BaseModel):
    """COCO run-length encoding: `size` [height, width]; `counts` the runs (from 0s) or pycocotools' string."""

    model_config = INPUT_CONFIG

    size: Annotated[list[integer(ge=1)], Field(min_length=2, max_length=2, description="[height, width]")]
    counts: Annotated[str, Field(pattern=r"^[0-o]*$")] | list[integer(ge=0)] = Field(
        description="run lengths from 0s, or pycocotools' compressed string")

    def as_dict(self) -> dict:
        return {"size": list(self.size), "counts": self.counts}


def one_of(*names: str, requires: dict[str, tuple[str, ...]] | None = None, noun: str = "value"):
    """A pydantic model validator: exactly one of `names` holds a value; `requires`: fields that one of
    them needs beside it (polygons need the image's width and height); `noun` names what they are."""
    requires = requires or {}

    def check(model):
        given = [n for n in names if getattr(model, n, None)]
        if len(given) != 1:
            what = f"no {noun} was sent" if not given else f"{len(given)} {noun}s were sent ({', '.join(given)})"
            raise ValueError(f"{what}; send exactly one of {', '.join(names)}")
        missing = [n for n in requires.get(given[0], ()) if getattr(model, n, None) is None]
        if missing:
            raise ValueError(f"{given[0]} needs {' and '.join(missing)} as well")
        return model

    return model_validator(mode="after")(check)


def one_of_schema(names: tuple[str, ...], requires: dict[str, tuple[str, ...]] | None = None):
    """`json_schema_extra` stating `one_of` in the model's JSON schema: a `oneOf` with one branch per
    field of `names`: that field holds a value (not null), with the fields `requires` names for it,
    and none of the others does (so a field given without what it needs is no branch at all)."""
    requires = requires or {}

    def given(props: dict, fields) -> dict:
        return {"required": list(fields), "properties": {n: _not_null(props[n]) for n in fields if n in props}}

    def extra(schema: dict) -> None:
        props = schema.get("properties", {})
        present = [n for n in names if n in props]
        schema["oneOf"] = [
            {**given(props, [name, *requires.get(name, ())]),
             "not": {"anyOf": [given(props, [other]) for other in present if other != name]}}
            for name in present
        ]
        schema["description"] = (schema.get("description", "") + f" Exactly one of: {', '.join(names)}." + "".join(
            f" {name} needs {' and '.join(needed)}." for name, needed in requires.items())).strip()

    return extra


def _not_null(prop: dict) -> dict:
    """The type of a property without its `null` option: whether it holds a value (its other limits are
    stated on the property itself)."""
    types = [o.get("type") for o in prop.get("anyOf", [prop]) if o.get("type") not in ("null", None)]
    if not types and "$ref" in str(prop):
        types = ["object"]  # a nested model
    return {"type": types[0]} if len(types) == 1 else {"anyOf": [{"type": t} for t in types]}


def batch_entry_model(fields: RequestFields) -> type[BaseModel]:
    """One image of a /segment_batch request (uploads go to /segment)."""
    namespace = {
        "__annotations__": {
            "image_url": fields.ImageUrl,
            "image_base64": fields.ImageBase64,
            "prompt": fields.Prompt,
            "model": fields.Model,
            "mask_format": fields.MaskFormat,
            "task": Annotated[TaskName, Field(description="segment (boxes and masks) or detect (boxes)")],
            "labels_from_prompt": Flag,
        },
        "image_url": None,
        "image_base64": None,
        "model": None,
        "mask_format": "rle",
        "task": "segment",
        "labels_from_prompt": False,
        "model_config": ConfigDict(**INPUT_CONFIG, json_schema_extra=one_of_schema(("image_url", "image_base64"))),
        "_one_image": one_of("image_url", "image_base64", noun="image"),
        "__module__": __name__,
        "__doc__": "One image of a /segment_batch request, by URL or base64 (uploads go to /segment).",
    }
    return type("BatchEntry", (BaseModel,), namespace)
