"""The OpenAI-compatible API, mounted at `/v1` on the public service: what OpenAI's SDK, LangChain,
LiteLLM and other OpenAI-compatible clients speak.

- `POST /v1/chat/completions`: one user message with an image and the PaliGemma prompt (the request's
  rules: openai_format.py). The answer's `message.content` is the model's text (what `/segment` and
  `/detect` answer as `text`) and `message.segmentation` the parsed answer exactly as those routes give
  it (masks in `mask_format`). With `stream: true`, server-sent `chat.completion.chunk`s carry the text
  as the engine's running batch decodes it (engines.py `predict_stream`), then a chunk with the
  finish reason and the segmentation, a usage chunk if asked for, and `[DONE]`. A client that leaves
  closes the engine's stream: the engine cancels the request and frees its slot.
- `GET /v1/models`, `GET /v1/models/{id}`: the served models and LoRA adapters (`parent`: their base;
  `root`: an adapter's directory in SEG_ADAPTER_DIR when it was loaded while serving).
- `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter` (only with `SEG_RUNTIME_ADAPTERS=true`, only
  with the admin key): vLLM's routes and bodies, sent on to every engine replica (adapter_admin.py).

Errors come in OpenAI's shape with the statuses the SDK maps to its exception classes; the errors other
layers answer on `/v1` (API key, body size, unknown routes) too: the public service's `errors.ErrorAnswers`
writes them in `openai_format.OpenAIErrorShape`. The routes talk to the service instance BentoML runs
(`bentoml.get_current_service()`): its `engine` (RemoteEngines), `served_models()`, and `read_picture()`
and `answer_body()`, which read images and write answers for /segment too (the same checks, limits,
pixel budget and bytes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..model.predictions import Prediction
from . import adapter_admin, api
from .bento import EngineItem
from .metrics import observe_inter_token, observe_time_to_first_token
from .openai_format import (
    ChatRequest,
    OpenAIError,
    chunk,
    completion,
    error_body,
    logprobs_content,
    model_card,
    model_list,
    parse_chat_request,
    sse,
    usage_chunk,
)
from .settings import Settings

logger = logging.getLogger(__name__)


def error_response(exc: OpenAIError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def from_request_error(exc: api.RequestError, param: str | None = None) -> OpenAIError:
    """A check's or the engine's refusal (api.RequestError, engines.EngineError) in OpenAI's terms."""
    retry = exc.retry_after if exc.retry_after is not None or exc.status not in (429, 503) else 1
    return OpenAIError(str(exc), exc.status, param=param, retry_after=retry)


class OpenAIRoutes:
    """The `/v1` routes. `backend`: the public service instance (default: the one BentoML runs)."""

    def __init__(self, settings: Settings, backend=None) -> None:
        self.settings = settings
        self._backend = backend
        self.created = int(time.time())

    @property
    def backend(self):
        if self._backend is not None:
            return self._backend
        import bentoml

        return bentoml.get_current_service()

    def app(self) -> Starlette:
        async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
            return JSONResponse(error_body(exc.detail, exc.status_code), status_code=exc.status_code,
                                headers=exc.headers)

        routes = [
            Route("/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/models", self.models, methods=["GET"]),
            Route("/models/{model_id:path}", self.model, methods=["GET"]),
        ]
        if self.settings.runtime_adapters:  # else absent: 404, as on a server without them
            routes += [Route("/load_lora_adapter", self.load_lora_adapter, methods=["POST"]),
                       Route("/unload_lora_adapter", self.unload_lora_adapter, methods=["POST"])]
        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    # ---- adapters loaded and unloaded while serving (adapter_admin.py) --------------------------------------

    async def load_lora_adapter(self, request: Request) -> JSONResponse:
        return await self._adapter_operation(request, "load")

    async def unload_lora_adapter(self, request: Request) -> JSONResponse:
        return await self._adapter_operation(request, "unload")

    async def _adapter_operation(self, request: Request, operation: str) -> JSONResponse:
        """Check the body's shape, send it to every engine replica, answer what they did (adapter_admin.summarize).
        The admin key was checked before (guard.py)."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if media_type != "application/json":
                raise OpenAIError("the body must be JSON (Content-Type: application/json)", 415)
            try:
                body = json.loads(await request.body())
            except ValueError as exc:
                raise OpenAIError("the request body is not valid JSON") from exc
            try:
                fields = adapter_admin.check_body(body, load=operation == "load")
            except adapter_admin.AdminError as exc:
                raise OpenAIError(str(exc), exc.status) from exc
            engine_body = {k: v for k, v in fields.items() if v is not None}
            reports = await self.backend.engine.broadcast(f"/{operation}_lora_adapter", engine_body)
            self.backend.forget_models()  # the next request reads the new list
            status, answer = adapter_admin.summarize(operation, fields["lora_name"], reports)
            if status != 200:
                code = "model_not_found" if status == 404 else None
                raise OpenAIError(answer, status, param="lora_name" if status in (404, 409) else None, code=code)
        except OpenAIError as exc:
            return error_response(exc)
        return JSONResponse(answer)

    # ---- models ----------------------------------------------------------------------------------------

    async def models(self, request: Request) -> JSONResponse:
        try:
            served = await self.backend.served_models()
        except api.RequestError as exc:
            return error_response(from_request_error(exc))
        return JSONResponse(model_list(served, self.created))

    async def model(self, request: Request) -> JSONResponse:
        try:
            return JSONResponse(model_card(await self._served(request.path_params["model_id"]), self.created))
        except OpenAIError as exc:
            return error_response(exc)
        except api.RequestError as exc:
            return error_response(from_request_error(exc))

    async def _served(self, model_id: str) -> dict:
        served = await self.backend.served_models()
        for model in served:
            if model["id"] == model_id:
                return model
        raise OpenAIError(f"The model {api.quoted(model_id)} does not exist; served: "
                          f"{', '.join(m['id'] for m in served)}", 404, param="model", code="model_not_found")

    # ---- chat completions ------------------------------------------------------------------------------

    async def chat_completions(self, request: Request):
        started = time.perf_counter()
        try:
            try:
                body = json.loads(await request.body())
            except json.JSONDecodeError as exc:
                raise OpenAIError(f"the request body is not valid JSON (line {exc.lineno}, column {exc.colno})") \
                    from exc
            except ValueError as exc:  # not UTF-8
                raise OpenAIError("the request body is not valid JSON (UTF-8 text)") from exc
            chat = parse_chat_request(body, max_tokens_cap=self.settings.max_new_tokens)
            model = await self._served(chat.model)
            item, size, fmt = await self._engine_item(chat, model)
            if chat.stream:
                return await self._stream(chat, item, size, fmt, started)
            outcome = await self.backend.engine.predict(item)
            if outcome.error:
                raise api.engine_refusal(outcome.error, outcome.status)
            prediction = Prediction.from_dict(outcome.prediction)
            segmentation = await self._segmentation(prediction, size, item.model, fmt)
        except OpenAIError as exc:
            return error_response(exc)
        except api.RequestError as exc:
            return error_response(from_request_error(exc))
        return JSONResponse(completion(
            ident=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=item.model,
            content=prediction.text, segmentation=segmentation, finish_reason=prediction.finish_reason,
            prompt_tokens=prediction.prompt_tokens, completion_tokens=prediction.generated_tokens,
            logprobs=logprobs_content(prediction.tokens, prediction.logprobs) if chat.logprobs else None,
        ))

    async def _engine_item(self, chat: ChatRequest, model: dict):
        """The request checked as /segment checks it, its image read: (engine item, the image's (width,
        height), mask format)."""
        try:
            fmt = api.check_mask_format(chat.mask_format)
        except api.RequestError as exc:
            raise from_request_error(exc, "mask_format") from exc
        try:
            parsed = api.check_prompt(chat.prompt, chat.task, self.settings, labels_from_prompt=chat.labels_from_prompt)
        except api.RequestError as exc:
            raise from_request_error(exc, "messages[0].content") from exc
        try:
            picture, width, height, _ = await self.backend.read_picture(
                model["image_size"], image_url=chat.image_url, image_base64=chat.image_base64)
        except api.RequestError as exc:
            raise from_request_error(exc, "messages[0].content") from exc
        item = EngineItem(model=model["id"], image=picture, task=parsed.task, classes=list(parsed.classes),
                          labels_from_prompt=parsed.labels_from_prompt, cut_after=chat.max_tokens)
        return item, (width, height), fmt

    async def _segmentation(self, prediction: Prediction, size: tuple[int, int], model_id: str, fmt: str) -> dict:
        """The parsed answer as /segment gives it: masks pasted on the original image, encoded as asked."""
        return await self.backend.answer_body(prediction, *size, model_id=model_id, fmt=fmt)

    async def _stream(self, chat: ChatRequest, item: EngineItem, size: tuple[int, int], fmt: str, started: float):
        """The engine's stream, opened and read up to its first event before answering 200: a request the
        engine refuses or sheds is answered with its own status (and Retry-After), not inside a stream."""
        events = self.backend.engine.predict_stream(item)
        try:
            first = await anext(events)
        except BaseException:
            await events.aclose()
            raise
        if "outcome" in first and first["outcome"].error:
            await events.aclose()
            raise api.engine_refusal(first["outcome"].error, first["outcome"].status)
        chunks = self._chunks(chat, item.model, first, events, size, fmt, started)
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def _chunks(self, chat: ChatRequest, model_id: str, first: dict, events: AsyncIterator[dict],
                      size: tuple[int, int], fmt: str, started: float) -> AsyncIterator[str]:
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream = StreamState(chat, started)

        def piece(delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> str:
            return sse(chunk(ident=ident, created=created, model=model_id, delta=delta, finish_reason=finish_reason,
                             logprobs=logprobs, include_usage=chat.include_usage))

        async with contextlib.aclosing(events):  # a client that leaves closes the engine's stream
            try:
                yield piece({"role": "assistant", "content": ""})
                event = first
                while "outcome" not in event:
                    text = stream.text(event["text"], event["tokens"], event["logprobs"])
                    if text is not None:
                        yield piece({"content": text[0]}, logprobs=text[1])
                    event = await anext(events)
                outcome = event["outcome"]
                if outcome.error:
                    raise api.engine_refusal(outcome.error, outcome.status)
                prediction = Prediction.from_dict(outcome.prediction)
                rest = stream.rest(prediction)
                if rest is not None:
                    yield piece({"content": rest[0]}, logprobs=rest[1])
                segmentation = await self._segmentation(prediction, size, model_id, fmt)
                yield piece({"segmentation": segmentation}, finish_reason=prediction.finish_reason)
                if chat.include_usage:
                    yield sse(usage_chunk(ident=ident, created=created, model=model_id,
                                          prompt_tokens=prediction.prompt_tokens,
                                          completion_tokens=prediction.generated_tokens))
                yield sse("[DONE]")
            except api.RequestError as exc:  # the engine failed or left mid-stream: the SDK raises APIError
                yield sse(from_request_error(exc).body())
            except Exception:
                logger.exception("a streamed answer failed")
                yield sse(error_body("the server failed to finish the answer; retry shortly", 500))


class StreamState:
    """What a stream has sent: its text and tokens so far; the clocks of time to first token and inter-token
    latency (metrics)."""

    def __init__(self, chat: ChatRequest, started: float) -> None:
        self.logprobs = chat.logprobs
        self.started = started
        self.sent_text = ""
        self.sent_tokens = 0
        self.last: float | None = None

    def text(self, text: str, tokens: list[str], logprobs: list[float]) -> tuple[str, dict | None] | None:
        """A piece to send (content, logprobs), or None when there is nothing new to show."""
        self.sent_tokens += len(tokens)
        if not text and not (self.logprobs and tokens):
            return None
        self.sent_text += text
        self._observe(len(tokens))
        return text, logprobs_content(tokens, logprobs) if self.logprobs else None

    def rest(self, prediction: Prediction) -> tuple[str, dict | None] | None:
        """The answer's text and tokens the stream has not sent yet (those of its last steps)."""
        if not prediction.text.startswith(self.sent_text):
            logger.warning("a streamed answer's text changed after it was sent; its final text is in segmentation")
            remainder = ""
        else:
            remainder = prediction.text[len(self.sent_text):]
        tokens, logprobs = prediction.tokens[self.sent_tokens:], prediction.logprobs[self.sent_tokens:]
        if not remainder and not (self.logprobs and tokens):
            return None
        self.sent_text += remainder
        self._observe(len(tokens))
        return remainder, logprobs_content(tokens, logprobs) if self.logprobs else None

    def _observe(self, tokens: int) -> None:
        now = time.perf_counter()
        if self.last is None:
            observe_time_to_first_token(now - self.started)
        else:
            observe_inter_token(now - self.last, tokens)
        self.last = now


def create_app(settings: Settings, backend=None) -> Starlette:
    """The `/v1` app to mount on the public service (`bentoml.asgi_app(create_app(SETTINGS), path="/v1")`)."""
    return OpenAIRoutes(settings, backend).app()
