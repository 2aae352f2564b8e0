"""BentoML service: text-prompted segmentation with PaliGemma 2, adaptively batched.

Two services in one server:

- `SegmentationEngine` owns the models (PaliGemma variants and the mask decoder). With step-level
  batching (`SEG_SCHEDULER=steps`, the default with the graph engine) its `predict` API takes each
  request as it comes and hands it to the engine's scheduler, which lets it join the running batch
  between decode steps and answers it when its own row ends. With `SEG_SCHEDULER=batches` the API is
  batchable: BentoML gathers concurrent requests into a batch that runs to its longest row. Either way
  each item gets its own outcome (one item's failure never fails its neighbours).
- `Segmentation` is the public face: it reads and checks each request, sends the model's share to
  the engine, and pastes and encodes the masks, so CPU work runs beside the batched model work.

LoRA adapters load at start (SEG_ADAPTERS) and, with SEG_RUNTIME_ADAPTERS=true, while serving: the public
tier's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (admin key) reach every engine's routes of the
same names (segmentation/serving/adapter_admin.py).

Scale out: `bentoml serve service:SegmentationEngine` serves the engine alone, and
`SEG_ENGINE_URL=http://host:port bentoml serve service:Segmentation` the public tier against it
(never loading torch or the models); see `segmentation/serving/engines.py`.

All logic lives in the `segmentation` package; this file is glue. Settings come from environment
variables (see `segmentation/serving/settings.py` and the README), read when this module is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import bentoml
from PIL import Image

from segmentation.model.checkpoints import CheckpointError
from segmentation.model.images import model_input
from segmentation.model.predictions import Prediction, assemble
from segmentation.model.render import render_overlay
from segmentation.serving import api, budget, errors, framing, inputs, openapi, webui
from segmentation.serving.adapter_admin import ADMIN_PATHS, RuntimeAdapters, admin_key_problem, checked_adapter_dir
from segmentation.serving.bento import (
    EngineItem,
    EngineOutcome,
    answer,
    engine_outcome,
    predict_requests,
    refuse_bentoml_downloads,
    strict_api,
)
from segmentation.serving.disconnect import CancelOnDisconnect
from segmentation.serving.engines import RemoteEngines, local_engine_url, stream_event
from segmentation.serving.guard import RequestGuard
from segmentation.serving.lifecycle import (
    exit_nonzero_after_a_failed_start,
    restart_worker,
    stop_server,
    stop_server_on_failure,
)
from segmentation.serving.metrics import (
    EngineLoad,
    EngineLoadMiddleware,
    SchedulerMetrics,
    count_adapter_operation,
    observe_outcome,
    observe_stage,
    set_engine_slots,
    watch_engine_steps,
)
from segmentation.serving.openai_api import create_app as openai_app
from segmentation.serving.openai_format import OpenAIErrorShape
from segmentation.serving.probes import HealthProbes, Readiness
from segmentation.serving.settings import Settings, adapter_tag, model_tag, read_secret
from segmentation.serving.store import VAE_FILE, checks_models, load_mask_encoder, preflight
from segmentation.serving.trust import EngineGate, exposure_problem, listening_address

SETTINGS = Settings.from_env()
# /readyz and /livez are answered by our middleware at once (BentoML's own /readyz can hang while
# the engine loads): ready once the engine answers.
READINESS = Readiness()
ENGINE_NAME = "paligemma-engine"
# Every model file is checked now (by `bentoml serve` and the engine's worker): a bad one stops the
# server with its name. The public service's workers and a public tier served alone skip it.
ADAPTER_BASES = preflight(SETTINGS) if checks_models(SETTINGS, ENGINE_NAME) else {}
ENGINE_LOAD = EngineLoad()
refuse_bentoml_downloads()
exit_nonzero_after_a_failed_start()  # `bentoml serve` exits 1 when a worker stopped it (lifecycle.py)


class SegmentationEngine:
    def __init__(self) -> None:
        problem = exposure_problem(listening_address(), token=SETTINGS.engine_token, insecure=SETTINGS.engine_insecure)
        if problem:
            stop_server(problem)  # before loading anything: a respawned worker would refuse again
        # A start that fails would fail the same way again: stop the server once, with the reason (BentoML
        # would otherwise start this worker again for ever).
        with stop_server_on_failure("the model engine"):
            self._start()

    def _start(self) -> None:
        from segmentation.model.compute import compute_thread  # torch: the engine's process only
        from segmentation.model.graph.decoder import GraphSettings
        from segmentation.serving.pool import ModelPool

        # All torch work of this process runs on one thread (segmentation/model/compute.py says why).
        self.compute = compute_thread()
        self.pool = self.compute.run(
            ModelPool.load,
            {model_id: self._model_dir(i, model_id) for i, model_id in enumerate(SETTINGS.models)},
            Path(self.vae.path) / VAE_FILE,
            adapters={
                adapter_id: (ADAPTER_BASES[adapter_id], Path(getattr(self, f"adapter_{i}").path))
                for i, adapter_id in enumerate(SETTINGS.adapters)
            },
            device=SETTINGS.torch_device,
            constrained=SETTINGS.constrained,
            dtype=SETTINGS.dtype,
            generation=SETTINGS.engine,
            share_images=SETTINGS.share_images,
            max_new_tokens=SETTINGS.max_new_tokens,
            objects_per_class=SETTINGS.objects_per_class,
            graph=GraphSettings(buckets=SETTINGS.graph_buckets, sync_every=SETTINGS.sync_every,
                                prompt_tokens=SETTINGS.graph_prompt_tokens, require=SETTINGS.require_graphs,
                                prefill_attention=SETTINGS.prefill_attention, max_adapters=SETTINGS.max_adapters,
                                max_lora_rank=SETTINGS.max_lora_rank, runtime_adapters=SETTINGS.runtime_adapters),
            batch_invariant=SETTINGS.batch_invariant,
            max_prompt_chars=SETTINGS.max_prompt_chars,
            max_classes=SETTINGS.max_classes,
        )
        watch_engine_steps(self.pool.engines.values())  # seg_engine_steps_total{path}: fallbacks show
        # One short generation per model (graph engines capture their CUDA graphs in it), so /readyz
        # turns green only when answers are fast.
        self.compute.run(self.pool.warm_up)
        self.pool.compute = self.compute
        if SETTINGS.runtime_adapters:  # the set loaded so far (the manifest), before the first request
            self.runtime = RuntimeAdapters(self.pool, checked_adapter_dir(SETTINGS.adapter_dir),
                                           on_outcome=count_adapter_operation)
            self.compute.run(self.runtime.restore, self.pool.load_adapter_now)
        if SETTINGS.scheduler == "steps":
            metrics = SchedulerMetrics(ENGINE_LOAD)
            self.pool.start_schedulers(on_finish=metrics.row_finished, on_step=metrics.stepped,
                                       max_wait_s=SETTINGS.max_latency_ms / 1000, thread=self.compute,
                                       on_broken=restart_worker)
        set_engine_slots(SETTINGS.graph_buckets[-1] if SETTINGS.scheduler == "steps" else SETTINGS.max_batch_size)

    def __is_ready__(self) -> bool:
        return self.pool.broken is None

    def __is_alive__(self) -> bool:
        # A scheduler that gave up (a CUDA error) never recovers in this process: let the orchestrator
        # restart it (a Kubernetes liveness probe on /livez; the scheduler already answers 503).
        return self.pool.broken is None

    def _model_dir(self, index: int, model_id: str) -> Path:
        if SETTINGS.model_source == "hub":
            from huggingface_hub import snapshot_download

            # One download into HF_HOME (a mounted volume) serves every later start and pod.
            token = read_secret("HF_TOKEN", "HF_TOKEN_FILE")
            return Path(snapshot_download(model_id, token=token))
        return Path(getattr(self, f"paligemma_{index}").path)

    @bentoml.api
    def describe(self) -> list[dict]:
        """The served models: id, input size, default; then the LoRA adapters with their base."""
        return self.pool.describe()

    if SETTINGS.runtime_adapters:  # adapters loaded and unloaded while serving (adapter_admin.py)
        @bentoml.api(route="/load_lora_adapter")
        async def load_lora_adapter(self, lora_name: str, lora_path: str, base: str | None = None) -> dict:
            return await self.runtime.load({"lora_name": lora_name, "lora_path": lora_path, "base": base})

        @bentoml.api(route="/unload_lora_adapter")
        async def unload_lora_adapter(self, lora_name: str) -> dict:
            return await self.runtime.unload({"lora_name": lora_name})

    if SETTINGS.scheduler == "steps":
        @bentoml.api
        async def predict(self, items: list[EngineItem]) -> list[EngineOutcome]:
            # Each request on its own: the scheduler batches at the level of decode steps. A request
            # cancelled here (its client left) frees its slot.
            requests = predict_requests(items)
            outcomes = await asyncio.gather(*(
                self.pool.predict_one(r, timeout_s=SETTINGS.request_timeout_s) for r in requests))
            for outcome in outcomes:
                observe_outcome(outcome)
            return [engine_outcome(outcome) for outcome in outcomes]
    else:
        # BentoML refuses max_batch_size=1 for a batchable API: SEG_MAX_BATCH_SIZE=1 turns batching off.
        @bentoml.api(**(
            dict(batchable=True, max_batch_size=SETTINGS.max_batch_size, max_latency_ms=SETTINGS.max_latency_ms)
            if SETTINGS.max_batch_size > 1 else {}
        ))
        def predict(self, items: list[EngineItem]) -> list[EngineOutcome]:
            ENGINE_LOAD.batch_started(len(items))
            try:
                outcomes = self.compute.run(self.pool.predict, predict_requests(items))
            finally:
                ENGINE_LOAD.batch_finished()
            for outcome in outcomes:
                observe_outcome(outcome)
            return [engine_outcome(outcome) for outcome in outcomes]

    @bentoml.api
    async def predict_stream(self, item: EngineItem) -> AsyncGenerator[str, None]:
        """One request answered as its row decodes: server-sent events of its new text, then its outcome
        (engines.py reads them). With adaptive batches (`SEG_SCHEDULER=batches`) the answer comes whole."""
        [request] = predict_requests([item])
        events = self.pool.stream_one(request, timeout_s=SETTINGS.request_timeout_s) \
            if SETTINGS.scheduler == "steps" else self._whole(request)
        async with contextlib.aclosing(events):  # a caller that leaves cancels the request
            async for event in events:
                if "outcome" in event:
                    observe_outcome(event["outcome"])
                    event = {"outcome": engine_outcome(event["outcome"]).model_dump(mode="json")}
                yield stream_event(event)

    async def _whole(self, request):
        ENGINE_LOAD.batch_started(1)
        try:
            [outcome] = await asyncio.to_thread(self.compute.run, self.pool.predict, [request])
        finally:
            ENGINE_LOAD.batch_finished()
        yield {"outcome": outcome}


# The models the engine serves are class attributes, so `bentoml build` records them in the bento and
# `containerize` bakes them into the image. Which ones is an environment variable (SEG_MODELS), so
# they are attached before the class becomes a service (BentoML collects models at that moment).
if SETTINGS.model_source == "store":
    for _index, _model_id in enumerate(SETTINGS.models):
        setattr(SegmentationEngine, f"paligemma_{_index}", bentoml.models.BentoModel(model_tag(_model_id)))
for _index, _adapter_id in enumerate(SETTINGS.adapters):  # adapters always come from the store
    setattr(SegmentationEngine, f"adapter_{_index}", bentoml.models.BentoModel(adapter_tag(_adapter_id)))
SegmentationEngine.vae = bentoml.models.BentoModel(SETTINGS.vae_tag)
SegmentationEngine = bentoml.service(
    name=ENGINE_NAME,
    workers=1,
    traffic={"timeout": SETTINGS.request_timeout_s},
    # BentoML recycles the client between services every 100 requests / 300 s, failing requests in
    # flight ("Server disconnected"); never recycle it.
    runner_connection={"max_requests": 10**9, "max_age": 1e9},
)(SegmentationEngine)


# Before anything reads a body: the token, JSON only (never a pickle), the wire version (trust.py); then
# the body's size.
SegmentationEngine.add_asgi_middleware(EngineGate, token=SETTINGS.engine_token)
SegmentationEngine.add_asgi_middleware(RequestGuard, default_max_body_bytes=SETTINGS.engine_max_body_bytes())
SegmentationEngine.add_asgi_middleware(EngineLoadMiddleware, load=ENGINE_LOAD,
                                       paths=frozenset({"/predict", "/predict_stream"}))
# A request whose caller left stops at once (with step-level batching its slot is freed).
SegmentationEngine.add_asgi_middleware(CancelOnDisconnect, paths=frozenset({"/predict", "/predict_stream"}))


# The public API's field types: every limit the server enforces, in its input models and /docs.json.
F = inputs.RequestFields(SETTINGS)
IMAGE_SOURCES = ("image", "image_url", "image_base64")


class Segmentation:
    def __init__(self) -> None:
        problem = admin_key_problem(SETTINGS)
        if problem:
            stop_server(problem)
        self._models: list[dict] | None = None
        self._models_at = 0.0
        if SETTINGS.engine_urls:
            self.engine = RemoteEngines(
                list(SETTINGS.engine_urls), timeout_s=SETTINGS.request_timeout_s,
                max_in_flight=SETTINGS.engine_max_in_flight, token=SETTINGS.engine_token,
            )
        else:  # the engine BentoML serves beside this service, over its Unix socket, in JSON as well
            self.engine = RemoteEngines(
                [local_engine_url(ENGINE_NAME)], timeout_s=SETTINGS.request_timeout_s,
                max_in_flight=SETTINGS.max_concurrency, token=SETTINGS.engine_token,
            )
        READINESS.attach(self.engine)
        self._mask_encoder = None  # loaded by the first /encode: most servers never need it
        self._mask_encoder_lock = asyncio.Lock()
        # Full-size pixels this worker decodes, pastes and encodes at once, over all its requests (two
        # images of the largest size): memory is bounded by pixels in flight, not by images sent.
        self.pixels = budget.PixelBudget(2 * SETTINGS.max_pixels)

    async def served_models(self) -> list[dict]:
        # With runtime adapters the list changes: read again after a second (every worker of this tier;
        # the one that sent a load or unload at once: forget_models).
        stale = SETTINGS.runtime_adapters and time.monotonic() - self._models_at > 1.0
        if self._models is None or stale:
            self._models, self._models_at = await self.engine.describe(), time.monotonic()
        return self._models

    def forget_models(self) -> None:
        self._models = None

    async def _run(
        self,
        task: str,
        *,
        image: Path | None,
        image_url: str | None,
        image_base64: str | None,
        prompt: str | None,
        model: str | None,
        mask_format: str | None,
        labels_from_prompt: bool = False,
        keep_bytes: bool = False,
    ):
        """Check the request, run the engine: (prediction, width, height, model picture, the image file's
        bytes if `keep_bytes` else None, model id, mask format). The full-size picture lives only while it
        is decoded and resized."""
        models = await self.served_models()
        # With runtime adapters, a name not served (never loaded, or unloaded) is not found: 404.
        model_id = api.check_model(model, [m["id"] for m in models], unknown_status=404 if SETTINGS.runtime_adapters
                                   else 400)
        size = next(m["image_size"] for m in models if m["id"] == model_id)
        fmt = api.check_mask_format(mask_format)
        parsed = api.check_prompt(prompt, task, SETTINGS, labels_from_prompt=labels_from_prompt)
        picture, width, height, data = await self.read_picture(size, image, image_url, image_base64,
                                                               keep_bytes=keep_bytes)
        outcome = await self.engine.predict(
            EngineItem(model=model_id, image=picture, task=parsed.task, classes=list(parsed.classes),
                       labels_from_prompt=parsed.labels_from_prompt)
        )
        if outcome.error:
            raise api.engine_refusal(outcome.error, outcome.status)
        return Prediction.from_dict(outcome.prediction), width, height, picture, data, model_id, fmt

    async def read_picture(self, size: int, image: Path | None = None, image_url: str | None = None,
                           image_base64: str | None = None, *, keep_bytes: bool = False):
        """The request's image read and checked, and resized to the model's input `size` within the worker's
        pixel budget: (model picture, width, height, the image file's bytes if `keep_bytes` else None). The
        full-size picture lives only while it is decoded and resized. (The /v1 routes read images here too.)"""
        start = time.perf_counter()
        data = await api.read_image_bytes(SETTINGS, image, image_url, image_base64)
        pixels = api.image_pixels(data, SETTINGS.max_pixels)
        async with self.pixels.hold(pixels):
            original = await api.decode_image(SETTINGS, data)
            width, height = original.size
            picture = await asyncio.to_thread(model_input, original, size)
            del original
        observe_stage("decode_input", time.perf_counter() - start)
        return picture, width, height, data if keep_bytes else None

    async def answer_body(self, prediction: Prediction, width: int, height: int, *, model_id: str, fmt: str,
                          input_image: Image.Image | None = None) -> dict:
        """/segment's JSON answer for a prediction on a `width` x `height` image (also /v1's segmentation)."""
        start = time.perf_counter()
        masks = any(o.mask64 is not None for o in prediction.objects)
        # Pasting full-size masks is CPU work and memory: off the event loop, within the pixel budget (an
        # answer without masks holds nothing full-size and does not queue for it).
        async with self.pixels.hold(width * height) if masks else contextlib.nullcontext():
            body = await asyncio.to_thread(api.answer_body, prediction, width, height, model=model_id,
                                           mask_format=fmt, input_image=input_image)
        observe_stage("encode", time.perf_counter() - start)
        return body

    async def _json(self, task: str, *, return_input_image: bool = False, **kwargs) -> dict:
        prediction, width, height, picture, _, model_id, fmt = await self._run(task, **kwargs)
        return await self.answer_body(prediction, width, height, model_id=model_id, fmt=fmt,
                                      input_image=picture if return_input_image else None)

    @strict_api(route="/segment", one_of=IMAGE_SOURCES, noun="image")
    async def segment(
        self,
        *,
        image: Path = None,  # noqa: RUF013 -- plain `Path = None`: see FIELD-NOTES (multipart and JSON on one route)
        image_url: F.ImageUrl = None,
        image_base64: F.ImageBase64 = None,
        prompt: F.Prompt,
        model: F.Model = None,
        mask_format: F.MaskFormat = "rle",
        return_input_image: F.Flag = False,
        labels_from_prompt: F.Flag = False,
    ) -> dict:
        """Segment the objects a prompt names: labels, boxes, scores and masks (rle, png, polygon)."""
        return await answer(self._json(
            "segment", image=image, image_url=image_url, image_base64=image_base64, prompt=prompt,
            model=model, mask_format=mask_format, return_input_image=return_input_image,
            labels_from_prompt=labels_from_prompt,
        ))

    @strict_api(route="/detect", one_of=IMAGE_SOURCES, noun="image")
    async def detect(
        self,
        *,
        image: Path = None,  # noqa: RUF013
        image_url: F.ImageUrl = None,
        image_base64: F.ImageBase64 = None,
        prompt: F.Prompt,
        model: F.Model = None,
        return_input_image: F.Flag = False,
        labels_from_prompt: F.Flag = False,
    ) -> dict:
        """Detect the objects a prompt names: labels, boxes and scores (no masks)."""
        return await answer(self._json(
            "detect", image=image, image_url=image_url, image_base64=image_base64, prompt=prompt,
            model=model, mask_format="none", return_input_image=return_input_image,
            labels_from_prompt=labels_from_prompt,
        ))

    @strict_api(route="/render", one_of=IMAGE_SOURCES, noun="image")
    async def render(
        self,
        *,
        image: Path = None,  # noqa: RUF013
        image_url: F.ImageUrl = None,
        image_base64: F.ImageBase64 = None,
        prompt: F.Prompt,
        model: F.Model = None,
    ) -> Image.Image:
        """The input picture with masks, boxes, labels and scores drawn on it (PNG)."""
        return await answer(self._overlay(
            image=image, image_url=image_url, image_base64=image_base64, prompt=prompt, model=model,
        ))

    async def _overlay(self, **kwargs) -> Image.Image:
        prediction, width, height, _, data, _, _ = await self._run("segment", mask_format="none", keep_bytes=True,
                                                                   **kwargs)
        # The picture is decoded again (its bytes were kept, not its pixels, while the engine ran); the
        # overlay holds it, a float copy and every mask: three times a decode's share of the budget.
        async with self.pixels.hold(3 * width * height):
            original = await api.decode_image(SETTINGS, data)
            result = await asyncio.to_thread(assemble, prediction, width, height)
            overlay = await asyncio.to_thread(render_overlay, original, result.objects)
        overlay.format = "PNG"  # answered as image/png
        return overlay

    @strict_api(route="/segment_batch")
    async def segment_batch(self, requests: F.BatchEntries) -> list[dict]:
        """Several images in one request (by URL or base64), answered in order; each entry may fail alone.
        Entries are decoded as the worker's pixel budget allows, not all at once."""

        async def one(entry) -> dict:
            try:
                return await self._json(
                    entry.task, image=None, image_url=entry.image_url, image_base64=entry.image_base64,
                    prompt=entry.prompt, model=entry.model, mask_format=entry.mask_format,
                    labels_from_prompt=entry.labels_from_prompt,
                )
            except api.RequestError as exc:
                return {"error": str(exc), "status": exc.status}

        return list(await asyncio.gather(*(one(entry) for entry in requests)))

    @strict_api(route="/encode", one_of=("mask", "mask_base64", "rle", "polygons"),
                requires={"polygons": ("width", "height")}, noun="mask")
    async def encode(
        self,
        mask: Path = None,  # noqa: RUF013 -- see /segment's image
        mask_base64: F.MaskBase64 = None,
        rle: F.Rle = None,
        polygons: F.Polygons = None,
        width: F.Side = None,
        height: F.Side = None,
        box: F.Box = None,
        label: F.Label = "",
    ) -> dict:
        """A mask (image upload, base64, COCO RLE or polygons) and its label → PaliGemma's training text
        `<loc…>×4<seg…>×16 label`, made as big_vision made the model's targets; `box` (y1, x1, y2, x2 in
        0..1) defaults to the mask's tight box."""
        return await answer(self._encode(mask, mask_base64, rle, polygons, width, height, box, label))

    @staticmethod
    def _load_mask_encoder():
        try:
            return load_mask_encoder(SETTINGS)
        except CheckpointError as exc:
            errors.logger.error("request %s: the mask encoder cannot be loaded: %s", errors.current_request_id(), exc)
            raise api.RequestError("this server cannot encode masks: its mask encoder checkpoint is missing or "
                                   "unreadable (the server log says which)", 501) from exc

    async def _encode(self, upload, mask_base64, rle, polygons, width, height, box, label) -> dict:
        pixels, make_mask = await asyncio.to_thread(
            api.mask_source, SETTINGS, upload, mask_base64, rle, polygons, width, height)
        async with self.pixels.hold(pixels):
            mask = await asyncio.to_thread(make_mask)
            async with self._mask_encoder_lock:
                if self._mask_encoder is None:
                    self._mask_encoder = await asyncio.to_thread(self._load_mask_encoder)
            return await asyncio.to_thread(api.encode_body, self._mask_encoder, mask, label, box)

    @strict_api(route="/models")
    async def models(self) -> dict:
        """The served models with their input size; `default` marks the one used when none is named;
        LoRA adapters (named in `model` like any model) come last with their `base`."""
        return {"models": await self.served_models()}


# The public tier served alone (SEG_ENGINE_URL) talks to remote engines; otherwise BentoML serves the
# engine beside it (the dependency only starts it: calls go through serving/engines.py, in JSON).
if not SETTINGS.engine_urls:
    Segmentation.engine_service = bentoml.depends(SegmentationEngine)
Segmentation = bentoml.asgi_app(webui.create_app(), path="/ui")(  # the page to try it: /ui/
    bentoml.service(
        name="paligemma-segmentation",
        workers=SETTINGS.api_workers,
        traffic={"timeout": SETTINGS.request_timeout_s, "max_concurrency": SETTINGS.max_concurrency},
    )(Segmentation)
)
# The OpenAI-compatible API (segmentation/serving/openai_api.py).
Segmentation = bentoml.asgi_app(openai_app(SETTINGS), path="/v1")(Segmentation)
# Outermost first. Every answer gets a request id, every error answer the one shape and a log line
# (errors.py), on /v1 OpenAI's error shape (openai_api.py); keys and size caps before anything reads the
# body (guard.py); /docs.json as enforced (openapi.py); methods, media types and form structure checked
# before BentoML parses (framing.py).
errors.quiet_client_errors()
Segmentation.add_asgi_middleware(errors.ErrorAnswers, pattern_hints=inputs.pattern_hints(SETTINGS),
                                 own_shapes={"/v1/": OpenAIErrorShape})
Segmentation.add_asgi_middleware(
    RequestGuard,
    api_keys=SETTINGS.api_keys,
    admin_key=SETTINGS.admin_key if SETTINGS.runtime_adapters else None,
    admin_paths=ADMIN_PATHS,
    metrics_public=SETTINGS.metrics_public,
    max_body_bytes={"/segment_batch": SETTINGS.max_body_bytes(SETTINGS.max_batch_images)},
    default_max_body_bytes=SETTINGS.max_body_bytes(),
)
_API_ROUTES = {api_method.route: api_method.input_spec for api_method in Segmentation.apis.values()}
_GET_ROUTES = frozenset({"/models"})  # reads without fields: GET answers like POST {}
Segmentation.add_asgi_middleware(openapi.OpenAPIDocument, transform=lambda doc: openapi.complete_openapi(
    doc, openapi.route_docs(_API_ROUTES), api_keys=bool(SETTINGS.api_keys), metrics_public=SETTINGS.metrics_public,
    get_routes=_GET_ROUTES))
Segmentation.add_asgi_middleware(
    framing.RequestFraming,
    routes={route: framing.RouteForm.from_schema(spec.model_json_schema(), frozenset(spec.multipart_fields))
            for route, spec in _API_ROUTES.items()},
    read_paths=frozenset({"/", "/livez", "/readyz", "/healthz", "/metrics", "/docs.json", "/schema.json",
                          "/debug/modules"}),
    read_prefixes=("/ui", "/static_content/", "/assets/"),
    get_routes=_GET_ROUTES,
)
Segmentation.add_asgi_middleware(HealthProbes, readiness=READINESS, debug_modules=SETTINGS.debug_modules)
Segmentation.add_asgi_middleware(CancelOnDisconnect, paths=frozenset(
    {"/segment", "/detect", "/render", "/segment_batch", "/v1/chat/completions"}))
