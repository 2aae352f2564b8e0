"""OpenAI's chat-completions wire format for PaliGemma: reading a request, and building answers, stream
chunks, model cards and errors. Pure (no BentoML, no HTTP): `openai_api.py` serves it.

A request is one user message whose content holds exactly one image (`image_url` part: a `data:` URL or
an http(s) URL) and text parts, joined with a space: the PaliGemma prompt (`segment cat ; dog`, `detect
car`, or bare classes, which segment). Decoding is greedy: sampling parameters are accepted only at
values that leave greedy decoding as it is (`temperature` 0, `n` 1, ...), anything else is a 400 that
says so, and so is any field OpenAI does not define (as OpenAI answers). Extensions: `mask_format` and
`labels_from_prompt`, as `/segment` takes them (the SDK sends them with `extra_body`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..model.prompts import Task

# Fields of OpenAI's request that change nothing here (greedy decoding is deterministic; no storage).
IGNORED = frozenset({"user", "metadata", "service_tier", "parallel_tool_calls", "reasoning_effort", "seed",
                     "prompt_cache_key", "safety_identifier", "verbosity"})
EXTENSIONS = frozenset({"mask_format", "labels_from_prompt"})
# Fields accepted at the values that keep greedy decoding and plain text answers: field -> test, message.
ONLY_DEFAULTS = {
    "temperature": (lambda v: _number(v) and v == 0, "greedy decoding only: temperature must be 0 or absent"),
    "n": (lambda v: v == 1 and not isinstance(v, bool), "greedy decoding only: n must be 1 or absent"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "top_p must be in (0, 1] (greedy decoding ignores it)"),
    "frequency_penalty": (lambda v: _number(v) and v == 0, "frequency_penalty is not supported (0 or absent)"),
    "presence_penalty": (lambda v: _number(v) and v == 0, "presence_penalty is not supported (0 or absent)"),
    "logit_bias": (lambda v: v == {}, "logit_bias is not supported"),
    "stop": (lambda v: v in ("", []), "stop sequences are not supported"),
    "top_logprobs": (lambda v: v == 0 and not isinstance(v, bool),
                     "top_logprobs is not supported: the chosen tokens' log-probabilities come with logprobs: true"),
    "response_format": (lambda v: v == {"type": "text"}, "response_format must be text: the answer is the "
                                                         "model's text, its parsed objects in message.segmentation"),
    "tools": (lambda v: v == [], "tools are not supported"),
    "tool_choice": (lambda v: v in ("none", "auto"), "tools are not supported"),
    "functions": (lambda v: v == [], "functions are not supported"),
    "function_call": (lambda v: v in ("none", "auto"), "functions are not supported"),
    "modalities": (lambda v: v == ["text"], "the model answers text only"),
    "audio": (lambda v: False, "audio output is not supported"),
    "prediction": (lambda v: False, "predicted outputs are not supported"),
    "web_search_options": (lambda v: False, "web search is not supported"),
    "store": (lambda v: v is False, "stored completions are not supported"),
}
KNOWN = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options",
                   "logprobs"}) | IGNORED | EXTENSIONS | frozenset(ONLY_DEFAULTS)

IMAGE_HELP = ("send exactly one image as a content part {\"type\": \"image_url\", \"image_url\": {\"url\": ...}} "
              "(a data: URL or an http/https URL)")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- errors ---------------------------------------------------------------------------------------------

# OpenAI's error `type` and `code` per status (the SDK raises its exception class by status).
_ERROR_KINDS = {
    400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "forbidden"), 404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"), 413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"), 422: ("invalid_request_error", None),
    429: ("rate_limit_error", "rate_limit_exceeded"), 503: ("server_error", "overloaded"),
    504: ("server_error", "timeout"),
}


class OpenAIError(Exception):
    """A request answered with OpenAI's error shape: status, message, the request field at fault, and for
    a transient failure (429, 503) the seconds after which a retry may succeed."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.retry_after = message, status, param, code, retry_after

    def body(self) -> dict:
        return error_body(self.message, self.status, param=self.param, code=self.code)


def error_body(message: str, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    """`{"error": {"message", "type", "param", "code"}}` as OpenAI answers errors."""
    kind, default_code = _ERROR_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def is_error_body(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("error"), dict) and "message" in data["error"]


class OpenAIErrorShape:
    """OpenAI's error shape for `errors.ErrorAnswers(own_shapes=...)`: the public service's errors on `/v1`."""

    @staticmethod
    def message(body: bytes) -> str | None:
        """The message of a body in OpenAI's shape, else None."""
        try:
            data = json.loads(body)
        except ValueError:
            return None
        return str(data["error"]["message"]) if is_error_body(data) else None

    @staticmethod
    def body(message: str, status: int) -> bytes:
        return json.dumps(error_body(message, status)).encode()


# ---- the request ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatRequest:
    """A chat-completions request read for PaliGemma (every field checked; the prompt's own rules and the
    image are checked by the caller, as /segment checks them)."""

    model: str
    prompt: str
    task: Task
    image_url: str | None = None  # http(s): fetched by the server
    image_base64: str | None = None  # a data: URL
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    mask_format: str = "rle"
    labels_from_prompt: bool = False


def _optional(body: dict, name: str, kind, what: str):
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise OpenAIError(f"{name} must be {what}", param=name)
    return value


def parse_chat_request(body, *, max_tokens_cap: int) -> ChatRequest:
    """A chat-completions body as a ChatRequest; OpenAIError (400, naming the field) for anything else."""
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise OpenAIError(f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0])
    for name, (accepted, message) in ONLY_DEFAULTS.items():
        if body.get(name) is not None and not accepted(body[name]):
            raise OpenAIError(f"{message} (got {json.dumps(body[name])})", param=name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError("model is required: one of the ids GET /v1/models lists", param="model")
    prompt, image_url, image_base64 = _read_messages(body.get("messages"))
    first = prompt.split(maxsplit=1)[0].lower() if prompt.split() else ""
    stream = bool(_optional(body, "stream", bool, "true or false"))
    options = _optional(body, "stream_options", dict, "an object")
    if options is not None and not stream:
        raise OpenAIError("stream_options is only allowed with stream: true", param="stream_options")
    include_usage = bool(_optional(options or {}, "include_usage", bool, "true or false"))
    unknown_options = sorted(set(options or {}) - {"include_usage", "include_obfuscation"})
    if unknown_options:
        raise OpenAIError(f"stream_options.{unknown_options[0]} is not supported", param="stream_options")
    mask_format = _optional(body, "mask_format", str, "one of rle, png, polygon, none") or "rle"
    return ChatRequest(
        model=model, prompt=prompt, task="detect" if first == "detect" else "segment",
        image_url=image_url, image_base64=image_base64, max_tokens=_max_tokens(body, max_tokens_cap),
        stream=stream, include_usage=include_usage,
        logprobs=bool(_optional(body, "logprobs", bool, "true or false")), mask_format=mask_format,
        labels_from_prompt=bool(_optional(body, "labels_from_prompt", bool, "true or false")),
    )


def _max_tokens(body: dict, cap: int) -> int | None:
    values = {name: _optional(body, name, int, "a positive integer")
              for name in ("max_tokens", "max_completion_tokens")}
    given = {name: value for name, value in values.items() if value is not None}
    if len(set(given.values())) > 1:
        raise OpenAIError("max_tokens and max_completion_tokens differ; send one", param="max_completion_tokens")
    for name, value in given.items():
        if not 1 <= value <= cap:
            raise OpenAIError(f"{name} is {value}; this server answers 1 to {cap} tokens (SEG_MAX_NEW_TOKENS)",
                              param=name)
    return next(iter(given.values()), None)


def _read_messages(messages) -> tuple[str, str | None, str | None]:
    """(prompt, image URL, image data: URL) of the one user message."""
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("messages is required: one user message with an image and the prompt", param="messages")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if len(messages) != 1 or roles[0] != "user":
        raise OpenAIError(
            f"PaliGemma answers one user message (an image and its prompt), with no system prompt or earlier "
            f"turns; got the roles {roles}", param="messages")
    content = messages[0].get("content")
    if isinstance(content, str):
        raise OpenAIError(f"no image was sent; {IMAGE_HELP}", param="messages[0].content")
    if not isinstance(content, list) or not content:
        raise OpenAIError("content must be a list of parts: one image_url and text", param="messages[0].content")
    texts, images = [], []
    for index, part in enumerate(content):
        where = f"messages[0].content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise OpenAIError("image_url.url must be a data: URL or an http/https URL", param=where)
            images.append(url)
        else:
            raise OpenAIError(f"content parts may be text or image_url, not {json.dumps(kind)}", param=where)
    if len(images) != 1:
        what = "no image was sent" if not images else f"{len(images)} images were sent"
        raise OpenAIError(f"{what}; {IMAGE_HELP}", param="messages[0].content")
    [url] = images
    prompt = " ".join(t.strip() for t in texts if t.strip())
    return (prompt, None, url) if url.startswith("data:") else (prompt, url, None)


# ---- answers -------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_content(tokens: list[str], logprobs: list[float]) -> dict:
    """OpenAI's `logprobs` of a choice: each chosen token, its log-probability and its UTF-8 bytes."""
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                        for t, lp in zip(tokens, logprobs)], "refusal": None}


def completion(*, ident: str, created: int, model: str, content: str, segmentation: dict, finish_reason: str,
               prompt_tokens: int, completion_tokens: int, logprobs: dict | None = None) -> dict:
    """A `chat.completion`: the model's text, and the parsed answer as /segment gives it."""
    return {
        "id": ident, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None,
                                             "segmentation": segmentation},
                     "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(*, ident: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
          logprobs: dict | None = None, include_usage: bool = False) -> dict:
    """A `chat.completion.chunk` with one choice (`usage` null when the request asked for a usage chunk)."""
    body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk(*, ident: str, created: int, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: dict | str) -> str:
    """One server-sent event: `data: <JSON>` (or `data: [DONE]`) and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def model_card(model: dict, created: int) -> dict:
    """A served model (an entry of the engine's describe()) in OpenAI's shape; an adapter has its base as
    `parent`, and as `root` its directory in SEG_ADAPTER_DIR when it was loaded while serving (vLLM's `root`
    is the adapter's path), else its base."""
    base = model.get("base")
    return {"id": model["id"], "object": "model", "created": created, "owned_by": "paligemma-segmentation",
            "root": model.get("root") or base or model["id"], "parent": base, "image_size": model["image_size"],
            "default": bool(model.get("default"))}


def model_list(models: list[dict], created: int) -> dict:
    return {"object": "list", "data": [model_card(m, created) for m in models]}
