"""`/docs.json` as the server enforces it: every limit, both media types, every error answer.

BentoML writes the OpenAPI document from the input models, but flattens them: `str | None` becomes
`string`, nested models lose their constraints, a route with a file field offers only
multipart/form-data (JSON bodies work too), and the error answers it lists are not the ones the
server gives. `complete_openapi` rebuilds each API route's request body from the same pydantic
models that validate requests (so the limits cannot drift from what is enforced): a JSON body and,
where the route takes a file, a multipart body; `exactly one image` as `oneOf`; and the answers: 200
with its real schema, 400/405/413/415 (kind `invalid_request`: the request breaks this document),
400/413/415 with kind `unusable_input` (valid by this document, but the content cannot be used:
an undecodable image, a refused URL, an unknown model), 401, 429, 500, 503, 504.

`OpenAPIDocument` is the ASGI middleware that serves the rewritten document in place of BentoML's.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

from .errors import KINDS
from .framing import MAX_TEXT_PART_BYTES

UPLOAD_TYPES = "image/png, image/jpeg, image/webp, image/gif, image/bmp, image/tiff, application/octet-stream"

ERROR_SCHEMA = {
    "type": "object",
    "description": "Every error answer. `kind` says whose fault it is: `invalid_request` (the request breaks this "
                   "document), `unusable_input` (valid by this document, but its content cannot be used), or a "
                   "server-side state. The server's log line for the error carries the same `request_id`, which "
                   "is also the `X-Request-ID` header (the client's own when it sent a sane one).",
    "required": ["error", "detail", "kind", "request_id"],
    "properties": {
        "error": {"type": "string", "description": "what was wrong and what is accepted"},
        "detail": {"type": "string"},
        "kind": {"type": "string", "enum": list(KINDS)},
        "request_id": {"type": "string"},
    },
}

_MASK = {
    "type": "object", "nullable": True, "required": ["format"],
    "properties": {
        "format": {"type": "string", "enum": ["rle", "png", "polygon"]},
        "size": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
        "counts": {"type": "string"},
        "data": {"type": "string", "format": "byte"},
        "polygons": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
    },
}
_OBJECT = {
    "type": "object",
    "required": ["label", "score", "box", "box_normalized", "area", "mask"],
    "properties": {
        "label": {"type": "string"},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "box": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4,
                "description": "x0, y0, x1, y1 in pixels of the original image (end-exclusive)"},
        "box_normalized": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
        "area": {"type": "integer", "minimum": 0},
        "mask": _MASK,
    },
}
SEGMENTATION_SCHEMA = {
    "type": "object",
    "required": ["model", "width", "height", "prompt", "text", "objects"],
    "properties": {
        "model": {"type": "string"}, "width": {"type": "integer"}, "height": {"type": "integer"},
        "prompt": {"type": "string"}, "text": {"type": "string"},
        "objects": {"type": "array", "items": _OBJECT},
        "input_image": {"type": "string", "format": "byte", "description": "the model's input picture, PNG"},
    },
}
BATCH_SCHEMA = {
    "type": "array",
    "items": {"anyOf": [SEGMENTATION_SCHEMA, {
        "type": "object", "required": ["error", "status"],
        "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
        "description": "an entry that failed alone (its status as /segment would answer it)",
    }]},
}
ENCODE_SCHEMA = {
    "type": "object",
    "required": ["text", "locs", "codes", "label", "height", "width"],
    "properties": {
        "text": {"type": "string"},
        "locs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1023},
                 "minItems": 4, "maxItems": 4},
        "codes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 127},
                  "minItems": 16, "maxItems": 16},
        "label": {"type": "string"}, "height": {"type": "integer"}, "width": {"type": "integer"},
    },
}
MODELS_SCHEMA = {
    "type": "object", "required": ["models"],
    "properties": {"models": {"type": "array", "items": {
        "type": "object", "required": ["id"],
        "properties": {"id": {"type": "string"}, "image_size": {"type": "integer"}, "default": {"type": "boolean"},
                       "base": {"type": "string"}, "device": {"type": "string"}, "dtype": {"type": "string"},
                       "dtype_reason": {"type": "string"}, "batched_equals_solo": {"type": "string"},
                       # On a CPU: native bfloat16 or not, the instruction set, the engine's row isolation.
                       "cpu": {"type": "object", "properties": {
                           "model": {"type": "string"}, "capability": {"type": "string"},
                           "native_bfloat16": {"type": "boolean"}, "via": {"type": "string", "nullable": True},
                           "row_isolation": {"type": "string", "nullable": True}}},
                       # Stacked LoRA slots of a base; an adapter loaded while serving: its directory.
                       "lora_slots": {"type": "object"}, "root": {"type": "string"},
                       "loaded_at_runtime": {"type": "boolean"}},
    }}},
}


@dataclass(frozen=True)
class RouteDoc:
    """What the document says of one API route: its input model and the answer it gives."""

    input_model: Any  # a pydantic model class (BentoML's input spec)
    files: frozenset[str] = frozenset()
    answer: dict | None = None  # the 200 JSON schema
    answer_media_type: str = "application/json"
    body_required: bool = True
    text_limits: dict[str, int] = field(default_factory=dict)


# The 200 answer of each route of the public service.
ANSWERS = {
    "/segment": SEGMENTATION_SCHEMA,
    "/detect": SEGMENTATION_SCHEMA,
    "/segment_batch": BATCH_SCHEMA,
    "/encode": ENCODE_SCHEMA,
    "/models": MODELS_SCHEMA,
}
BINARY_ANSWERS = {"/render": "image/png"}


def route_docs(input_specs: dict[str, Any]) -> dict[str, RouteDoc]:
    """RouteDocs of the public service's routes from their BentoML input specs."""
    return {
        route: RouteDoc(spec, files=frozenset(spec.multipart_fields), answer=ANSWERS.get(route),
                        answer_media_type=BINARY_ANSWERS.get(route, "application/json"),
                        body_required=bool(spec.model_fields))
        for route, spec in input_specs.items()
    }


def _inline(schema: Any, defs: dict) -> Any:
    if isinstance(schema, dict):
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            merged = {**_inline(copy.deepcopy(defs[name]), defs), **{k: v for k, v in schema.items() if k != "$ref"}}
            return merged
        return {k: _inline(v, defs) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


def to_openapi30(schema: Any) -> Any:
    """A pydantic JSON schema as an OpenAPI 3.0 schema object: `null` in anyOf → nullable, `examples` →
    `example`, `const` → `enum`, BentoML's `file` type → binary string."""
    if isinstance(schema, list):
        return [to_openapi30(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    # pydantic leaves `ge`/`le` beside `minimum`/`maximum` on some unions: not OpenAPI keywords.
    out = {k: to_openapi30(v) for k, v in schema.items() if k not in ("examples", "const", "ge", "le", "gt", "lt")}
    if "examples" in schema and schema["examples"]:
        out["example"] = schema["examples"][0]
    if "const" in schema:
        out["enum"] = [schema["const"]]
    if out.get("type") == "file":
        out["type"], out["format"] = "string", "binary"
    options = out.get("anyOf")
    if isinstance(options, list) and any(o.get("type") == "null" for o in options):
        rest = [o for o in options if o.get("type") != "null"]
        out.pop("anyOf")
        if len(rest) == 1:
            out = {**rest[0], **out}
        else:
            out["anyOf"] = rest
        out["nullable"] = True
    return out


def _request_schema(route: RouteDoc, multipart: bool) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BentoML's file type has no JSON form for its default (None)
        raw = route.input_model.model_json_schema()
    schema = to_openapi30(_inline(raw, raw.pop("$defs", {})))
    schema.pop("$defs", None)
    schema["additionalProperties"] = False
    props = schema.setdefault("properties", {})
    if not multipart:
        for name in route.files:
            props.pop(name, None)
    else:
        for name in route.files:
            props[name] = {"type": "string", "format": "binary",
                           "description": f"the file itself ({UPLOAD_TYPES.replace(', application/octet-stream', '')},"
                                          " judged by its content)"}
        for name, prop in props.items():
            if name in route.files or prop.get("type") != "string":
                continue
            # Starlette's form parser holds a text value of at most 1 MiB.
            limit = route.text_limits.get(name, MAX_TEXT_PART_BYTES - 2)
            prop["maxLength"] = min(prop.get("maxLength", limit), limit)
    schema["required"] = [n for n in schema.get("required", []) if n in props]
    if not schema["required"]:
        schema.pop("required")
    # The file field's branch only where files can be sent; a file's presence is its branch.
    if "oneOf" in schema:
        schema["oneOf"] = [b for b in schema["oneOf"] if set(b.get("required", ())) <= set(props)]
    for branch in _branches(schema):
        for name in list(branch.get("properties", {})):
            if name in route.files:
                branch["properties"].pop(name)
            elif "maxLength" in branch["properties"][name] and "maxLength" in props.get(name, {}):
                branch["properties"][name]["maxLength"] = props[name]["maxLength"]
    return schema


def multipart_encoding(schema: dict, files: frozenset[str]) -> dict:
    """How each part is sent: files as image files; arrays and objects as one JSON part (not one part per
    item); scalars as plain text (a JSON string literal is decoded, see framing.py)."""
    encoding = {name: {"contentType": UPLOAD_TYPES} for name in sorted(files)}
    for name, prop in schema.get("properties", {}).items():
        if name not in files and (prop.get("type") in ("array", "object") or "anyOf" in prop):
            encoding[name] = {"contentType": "application/json"}
    return encoding


def _branches(schema: dict):
    """The `required`/`properties` branches of a request schema's oneOf and allOf rules."""
    stack = [*schema.get("oneOf", []), *schema.get("allOf", [])]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "properties" in node:
                yield node
            stack += [*node.get("anyOf", []), *node.get("allOf", []), *node.get("oneOf", [])]
            if isinstance(node.get("not"), dict):
                stack.append(node["not"])


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _responses(route: RouteDoc, keys: bool) -> dict:
    ok = {"description": "Successful Response"}
    if route.answer_media_type == "application/json":
        ok["content"] = {"application/json": {"schema": route.answer or {"type": "object"}}}
    else:
        ok["content"] = {route.answer_media_type: {"schema": {"type": "string", "format": "binary"}}}
    responses = {
        "200": ok,
        "400": _error("`invalid_request`: the body breaks this document (a field's type, a limit, an unknown field, "
                      "malformed JSON or multipart). `unusable_input`: valid by this document but unusable: the "
                      "image does not decode, the URL is refused or fails, the model is not served, the prompt "
                      "holds format/private-use/unassigned characters, a box or mask is inconsistent."),
        "405": _error("a method this route does not take (the `Allow` header lists them)"),
        "413": _error("the body is over the server's byte limit (`invalid_request`), or the image or mask is over "
                      "the byte or pixel limit (`unusable_input`)"),
        "415": _error("a Content-Type other than application/json, multipart/form-data or "
                      "application/x-www-form-urlencoded; or (`unusable_input`) an image_url whose answer is no image"),
        "429": _error("too many requests at once; retry after `Retry-After` seconds"),
        "500": _error("a server error; its log line carries the request id"),
        "503": _error("the model engine is busy, loading or restarting; retry after `Retry-After` seconds"),
        "504": _error("the request took longer than the server's timeout"),
    }
    if keys:
        responses["401"] = _error("a missing or wrong API key (`Authorization: Bearer <key>`)")
    return responses


def complete_openapi(doc: dict, routes: dict[str, RouteDoc], *, api_keys: bool = False,
                     metrics_public: bool = True, description: str | None = None,
                     get_routes: frozenset[str] = frozenset()) -> dict:
    """The OpenAPI document `doc` (BentoML's) with each API route in `routes` described as enforced;
    those in `get_routes` also answer GET (without a body: framing.RequestFraming)."""
    doc = copy.deepcopy(doc)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = ERROR_SCHEMA
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        components.pop(name, None)
    for path, route in routes.items():
        operation = doc.get("paths", {}).get(path, {}).get("post")
        if operation is None:
            continue
        content = {"application/json": {"schema": _request_schema(route, multipart=False)}}
        if route.files:
            content["multipart/form-data"] = {
                "schema": (content_schema := _request_schema(route, multipart=True)),
                "encoding": multipart_encoding(content_schema, route.files),
            }
        operation["requestBody"] = {"required": route.body_required, "content": content}
        operation["responses"] = _responses(route, api_keys)
        if path in get_routes:
            doc["paths"][path]["get"] = {key: copy.deepcopy(value) for key, value in operation.items()
                                         if key != "requestBody"} | {"operationId": f"get_{path.strip('/')}"}
        # BentoML's own input components are superseded by the request bodies above.
        for schema_name in [n for n in components if n.lower().startswith(path.strip("/").lower() + "input")
                            or n.lower() == f"{path.strip('/')}__input"]:
            components.pop(schema_name, None)
    for path, item in doc.get("paths", {}).items():
        if path in routes:
            continue
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            if path == "/readyz":
                responses["503"] = {"description": "not ready yet (loading) or the engine is unavailable",
                                    "content": {"application/json": {"schema": {
                                        "type": "object", "required": ["status"],
                                        "properties": {"status": {"type": "string"}, "reason": {"type": "string"}},
                                    }}}}
            if path == "/metrics" and api_keys and not metrics_public:
                responses["401"] = _error("a missing or wrong API key")
            responses.setdefault("405", _error("a method this route does not take"))
            for status, answer in list(responses.items()):
                if status.startswith(("4", "5")) and "$ref" in json.dumps(answer) and "Error" not in json.dumps(answer):
                    responses[status] = _error(answer.get("description", "error"))
    if description is not None:
        doc.setdefault("info", {})["description"] = description
    return doc


class OpenAPIDocument:
    """ASGI middleware: `GET /docs.json` answers `transform(BentoML's document)`, made once and kept."""

    def __init__(self, app, *, transform, path: str = "/docs.json") -> None:
        self.app = app
        self.transform = transform
        self.path = path
        self._body: bytes | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != self.path or scope.get("method") not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        if self._body is None:
            held: dict = {"body": b""}

            async def capture(message):
                if message["type"] == "http.response.start":
                    held["status"] = message["status"]
                elif message["type"] == "http.response.body":
                    held["body"] += message.get("body", b"")

            await self.app({**scope, "method": "GET"}, receive, capture)
            if held.get("status") != 200:
                return await self.app(scope, receive, send)
            self._body = json.dumps(self.transform(json.loads(held["body"]))).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(self._body)).encode())]})
        await send({"type": "http.response.body", "body": self._body if scope.get("method") == "GET" else b""})
