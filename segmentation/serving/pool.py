"""Several PaliGemma models and one mask decoder serving mixed batches, one failure at a time.

A server's batch mixes requests for different models and holds requests that may fail. The pool
groups a batch by base model (requests for a LoRA adapter join their base's group: PEFT runs rows of
the base and of several adapters in one call), generates each group in one call, and decodes the
masks of every object of the whole batch in one decoder call. A group whose generation raises (out
of memory, say) is retried in halves down to single requests, so one bad request fails alone and its
neighbours still get their answers.

With step-level batching (`start_schedulers`), each request goes on its own (`predict_one`) to its base
model's `StepScheduler`, which lets it join the running batch between decode steps and answers it as
soon as its own row ends; its masks are decoded in a worker thread while the engine keeps stepping.
`stream_one` hands out a request's text as its row decodes, then its outcome.

Adapters loaded while serving (`load_adapter`, `unload_adapter`; serving/adapter_admin.py) change the engine
between two of its scheduler's steps (`StepScheduler.call`); an unloaded adapter's requests are answered 404
at once, its rows in flight keep it, and its slot is freed after them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..model.compute import ComputeThread
from ..model.engine import Generation, PaliGemmaEngine
from ..model.graph.scheduler import EngineBroken, Overloaded, StepScheduler
from ..model.images import MAX_MODEL_SIDE
from ..model.predictions import Prediction
from ..model.prompts import MAX_CLASSES, MAX_PROMPT_CHARS, Prompt, PromptError, parse_prompt
from ..model.segmenter import ParsedGeneration, attach_masks, parse_generation, parse_generations
from ..model.vae import MaskDecoder

logger = logging.getLogger(__name__)


# What a client reads when the engine fails it (the cause goes to the server log, never to the client).
GENERATION_FAILED = "generation failed on the server; retry shortly"
MASKS_FAILED = "mask decoding failed on the server; retry shortly"
BROKEN = "the model engine failed and is restarting; retry shortly"


@dataclass
class PredictRequest:
    model: str
    image: Image.Image
    prompt: Prompt
    max_new_tokens: int | None = None  # force a budget (benchmarks); None: grown from the classes
    cut_after: int | None = None  # cut the answer after this many tokens (OpenAI's max_tokens)


@dataclass
class PredictOutcome:
    """A prediction, or why there is none. `status` is the HTTP status an error maps to."""

    prediction: Prediction | None = None
    error: str | None = None
    status: int = 200
    timings: dict[str, float] = field(default_factory=dict)


def _adapter_graphs(engine: PaliGemmaEngine, adapter_id: str) -> dict:
    """An adapter's place in its base's decode steps: its slot in the stacked weights (the base's steps and
    graphs serve its rows), or why it has none (its rows step eagerly through PEFT's hooks)."""
    status = engine.graph_status()
    lora = engine.adapter_status(adapter_id)
    if lora is None or lora["slot"] is not None:
        return {**status, **({"lora": lora} if lora else {})}
    return {**status, "captured": False, "buckets": [], "eager_buckets": list(engine.graph_settings.buckets),
            "lora": lora, "why": f"no slot in the stacked adapter weights ({lora['why']}): its rows step eagerly "
                                 "through PEFT's hooks"}


class ModelPool:
    """Engines by model id, and the adapters attached to them (adapter id -> its base's model id)."""

    def __init__(self, engines: dict[str, PaliGemmaEngine], decoder: MaskDecoder,
                 adapters: dict[str, str] | None = None, *, max_prompt_chars: int = MAX_PROMPT_CHARS,
                 max_classes: int = MAX_CLASSES):
        if not engines:
            raise ValueError("a pool needs at least one model")
        self.engines = engines
        self.decoder = decoder
        self.adapters = dict(adapters or {})
        self.schedulers: dict = {}  # base model id -> StepScheduler, once started
        # Adapters loaded while serving (load_adapter): their directory relative to SEG_ADAPTER_DIR; and the
        # ids unloaded since (their requests are answered 404). `compute`: the thread that runs the engines
        # before (or without) step schedulers.
        self.roots: dict[str, str] = {}
        self.unloaded: set[str] = set()
        self.compute: ComputeThread | None = None
        self._adapter_changes: asyncio.Lock | None = None  # one load or unload step at a time (made in the loop)
        self.max_prompt_chars, self.max_classes = max_prompt_chars, max_classes
        self._decoder_lock = threading.Lock()  # mask decoding from several worker threads
        for adapter_id, base in self.adapters.items():
            if base not in engines or adapter_id not in engines[base].adapters:
                raise ValueError(f"adapter {adapter_id!r} is not attached to a served base ({base!r})")

    @classmethod
    def load(cls, model_dirs: dict[str, Path], vae_file: Path, adapters: dict[str, tuple[str, Path]] | None = None,
             *, max_prompt_chars: int = MAX_PROMPT_CHARS, max_classes: int = MAX_CLASSES,
             **engine_options) -> ModelPool:
        """Engines for `model_dirs` (id -> checkpoint directory; the first is the default), each base's
        LoRA adapters (adapter id -> (base id, adapter directory)) attached unmerged, and the decoder.
        `engine_options` go to `PaliGemmaEngine.from_pretrained` (device, grammar, budgets); the prompt
        limits are checked again on every request (`refusal`)."""
        engines = {model_id: PaliGemmaEngine.from_pretrained(path, **engine_options)
                   for model_id, path in model_dirs.items()}
        adapters = adapters or {}
        for base, engine in engines.items():  # each base's adapters, loaded once
            attached = {adapter_id: path for adapter_id, (of, path) in adapters.items() if of == base}
            if attached or engine.graph_settings.runtime_adapters:  # runtime adapters: slots reserved now
                engine.attach_adapters(attached)
        decoder = MaskDecoder.from_npz(vae_file)
        decoder.warmup()
        return cls(engines, decoder, {adapter_id: base for adapter_id, (base, _) in adapters.items()},
                   max_prompt_chars=max_prompt_chars, max_classes=max_classes)

    @property
    def default_model(self) -> str:
        return next(iter(self.engines))

    def describe(self) -> list[dict]:
        """The served models (id, input size, default, then `PaliGemmaEngine.describe()`: device, dtype and
        why, where batched answers equal solo ones, whether their decode steps replay CUDA graphs and for
        which buckets, their prefill kernel, and on a CPU its facts: native bfloat16 or not and row
        isolation), then the LoRA adapters with their base and their slot in its stacked adapter weights."""
        models = [
            {"id": model_id, "image_size": engine.image_size, "default": model_id == self.default_model,
             **engine.describe(), **self.slots_of(model_id)}
            for model_id, engine in self.engines.items()
        ]
        adapters = [
            {"id": adapter_id, "image_size": self.engines[base].image_size, "default": False, "base": base,
             "batched_equals_solo": self.engines[base].invariance(),
             "graphs": _adapter_graphs(self.engines[base], adapter_id),
             **({"root": root, "loaded_at_runtime": True} if (root := self.roots.get(adapter_id)) else {})}
            for adapter_id, base in list(self.adapters.items())  # a copy: adapters load and unload meanwhile
        ]
        return models + adapters

    def slots_of(self, model_id: str) -> dict:
        """A base model's LoRA slots for /models (graph/lora.py), when it has stacked adapter weights."""
        status = self.engines[model_id].slot_status()
        return {"lora_slots": status} if status else {}

    # --- adapters loaded and unloaded while serving (adapter_admin.py) ------------------------------------

    async def _on_engine(self, base: str, fn):
        """`fn()` on the thread that runs `base`'s engine: between its scheduler's steps, or the compute thread."""
        if base in self.schedulers:
            return await asyncio.wrap_future(self.schedulers[base].call(fn))
        return await asyncio.to_thread(self.compute.run if self.compute else (lambda f: f()), fn)

    async def load_adapter(self, adapter_id: str, directory: Path, *, base: str | None = None, label: str,
                           root: str) -> dict:
        """Load an adapter into a free slot of its base's stacked weights (engine.load_adapter), between steps;
        it is served from the next request on. Returns its place; raises AdminError (4xx) when refused."""
        from ..model.adapters import AdapterError, check_runtime_adapter
        from ..model.graph.lora import SlotRefused
        from .adapter_admin import AdminError

        base = base or self.default_model
        if base not in self.engines:
            raise AdminError(f"base {base!r} is not served; served models: {', '.join(self.engines)}")
        if adapter_id in self.engines or adapter_id in self.adapters:
            raise AdminError(f"{adapter_id!r} is already served: unload it first, or choose another name", 409)
        engine = self.engines[base]
        try:
            async with self._changes():
                # The files are read and checked off the engine's thread first (no step waits for that); the
                # engine checks them again, cheaply, before it loads them between two steps.
                lora = engine.decoder.lora
                await asyncio.to_thread(check_runtime_adapter, directory, engine.model.get_base_model(),
                                        covered=frozenset(lora.stacks), max_rank=lora.rank, label=label, base_id=base)
                place = await self._on_engine(base, lambda: engine.load_adapter(adapter_id, directory, label=label,
                                                                                base_id=base))
        except KeyError:
            raise AdminError(f"{adapter_id!r} is still unloading (requests in flight use it); retry shortly",
                             409) from None
        except SlotRefused as exc:
            raise AdminError(f"{label}: {exc}", 409 if exc.full else 400) from exc
        except AdapterError as exc:
            raise AdminError(str(exc)) from exc
        self.adapters[adapter_id] = base
        self.roots[adapter_id] = root
        self.unloaded.discard(adapter_id)
        return place

    def load_adapter_now(self, adapter_id: str, directory: Path, base: str | None, label: str, root: str) -> None:
        """`load_adapter` before the schedulers start, on the engine's thread (the manifest at start)."""
        base = base or self.default_model
        if base not in self.engines:
            raise ValueError(f"base {base!r} is not served")
        if adapter_id in self.engines or adapter_id in self.adapters:
            raise ValueError(f"{adapter_id!r} is already served")
        self.engines[base].load_adapter(adapter_id, directory, label=label, base_id=base)
        self.adapters[adapter_id] = base
        self.roots[adapter_id] = root

    async def unload_adapter(self, adapter_id: str) -> str:
        """Unload an adapter loaded while serving: new requests for it are answered 404 at once; requests in
        flight keep it to their end; its slot is zeroed and freed after them, then this returns (its base).
        AdminError: 404 not loaded, 409 attached at start."""
        from .adapter_admin import AdminError

        base = self.adapters.get(adapter_id)
        if base is None:
            raise AdminError(f"no adapter {adapter_id!r} is loaded", 404)
        engine = self.engines[base]
        if adapter_id not in engine.loaded_at_runtime:
            raise AdminError(f"{adapter_id!r} was attached at start (SEG_ADAPTERS); restart without it to remove it",
                             409)
        del self.adapters[adapter_id]  # from here on its requests are refused (refusal: 404)
        self.roots.pop(adapter_id, None)
        self.unloaded.add(adapter_id)
        async with self._changes():
            name = await self._on_engine(base, lambda: engine.retire_adapter(adapter_id))
        scheduler = self.schedulers.get(base)
        while scheduler is not None and await self._on_engine(base, lambda: scheduler.uses(name)):
            await asyncio.sleep(0.05)
        async with self._changes():
            await self._on_engine(base, lambda: engine.free_adapter(name))
        return base

    def _changes(self) -> asyncio.Lock:
        """The lock of the adapter changes (PEFT's modules change under them: one at a time)."""
        if self._adapter_changes is None:
            self._adapter_changes = asyncio.Lock()
        return self._adapter_changes

    def warm_up(self) -> None:
        """One short generation per model and adapter, so the first real request is not the slow one."""
        for engine in self.engines.values():
            if engine.generation == "graph":
                engine.decoder  # noqa: B018 -- buffers and graphs (GraphCaptureError when required and failed)
        for model_id in [*self.engines, *self.adapters]:
            engine = self.engines[self.adapters.get(model_id, model_id)]
            picture = Image.new("RGB", (engine.image_size, engine.image_size))
            [outcome] = self.predict([PredictRequest(model_id, picture, Prompt("segment", ("cat",)), max_new_tokens=2)])
            if outcome.error:
                raise RuntimeError(f"warm-up of {model_id} failed: {outcome.error}")

    def start_schedulers(self, on_finish=None, on_step=None, max_wait_s: float | None = None,
                         thread: ComputeThread | None = None, on_broken=None) -> None:
        """Serve requests one at a time through a step-level scheduler per base model (graph engines).
        `on_finish(job, generation)` is called as each row ends (metrics); a request that waits more
        than `max_wait_s` for a slot is answered 503. The first model's scheduler runs on `thread` (the
        compute thread its engine was loaded on, see segmentation/model/compute.py), the others on
        threads of their own. `on_broken(reason)` is called when a scheduler gives up (a CUDA error)."""
        for model_id, engine in self.engines.items():
            if engine.generation != "graph":
                raise ValueError(f"step-level batching needs the graph engine; {model_id} runs {engine.generation!r}")
        for index, (model_id, engine) in enumerate(self.engines.items()):
            self.schedulers[model_id] = StepScheduler(engine, on_finish=on_finish, on_step=on_step,
                                                      max_wait_s=max_wait_s, thread=thread if index == 0 else None,
                                                      on_broken=on_broken)

    @property
    def broken(self) -> str | None:
        """Why a step scheduler gave up (the process must restart), or None."""
        return next((s.broken for s in self.schedulers.values() if s.broken), None)

    def close(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.close()

    def refusal(self, request: PredictRequest) -> PredictOutcome | None:
        """Why the engine will not run a request (400), or None. The public tier checks the same things,
        but the engine trusts no caller: whoever reaches its port gets only what a client may ask for."""
        if request.model in self.unloaded:
            return PredictOutcome(error=f"the adapter {request.model!r} was unloaded", status=404)
        base = self.adapters.get(request.model, request.model)
        if base not in self.engines:
            served = [*self.engines, *self.adapters]
            return PredictOutcome(error=f"unknown model {request.model!r}; served: {', '.join(served)}", status=400)
        engine = self.engines[base]
        if not isinstance(request.image, Image.Image) or max(request.image.size) > MAX_MODEL_SIDE \
                or request.image.mode != "RGB":
            return PredictOutcome(error=f"the picture must be RGB, at most {MAX_MODEL_SIDE} px a side "
                                        f"({engine.image_size} px squares are read as they are)", status=400)
        prompt = request.prompt
        try:
            # The public tier measured the prompt as typed; its normalised form adds up to two characters
            # (" ; " for ";") per class.
            parsed = parse_prompt(" ; ".join(prompt.classes), prompt.task,
                                  max_chars=self.max_prompt_chars + 2 * self.max_classes, max_classes=self.max_classes)
        except PromptError as exc:
            return PredictOutcome(error=str(exc), status=400)
        if parsed.classes != tuple(prompt.classes):
            return PredictOutcome(error="classes must be trimmed, non-empty and free of ';'", status=400)
        for name, value in (("max_new_tokens", request.max_new_tokens), ("cut_after", request.cut_after)):
            if value is not None and not 1 <= value <= engine.max_new_tokens:
                return PredictOutcome(error=f"{name} must be 1 to {engine.max_new_tokens}", status=400)
        return None

    async def predict_one(self, request: PredictRequest, timeout_s: float | None = None,
                          on_tokens=None) -> PredictOutcome:
        """One request through its model's scheduler; never raises for the request's own failure.
        `on_tokens(ids, logprobs)`: its row's new tokens as it decodes (StepScheduler.submit)."""
        refused = self.refusal(request)
        if refused is not None:
            return refused
        base = self.adapters.get(request.model, request.model)
        engine, start = self.engines[base], time.perf_counter()
        try:
            future = self.schedulers[base].submit(
                request.image, request.prompt, max_new_tokens=request.max_new_tokens,
                adapter=request.model if request.model in self.adapters else None, timeout_s=timeout_s,
                cut_after=request.cut_after, on_tokens=on_tokens,
            )
            generation = await asyncio.wrap_future(future)  # cancelling the caller cancels the request
            generation = self._conclude(engine, request, generation)
        except TimeoutError as exc:
            return PredictOutcome(error=str(exc), status=504)
        except Overloaded as exc:
            return PredictOutcome(error=f"the model is overloaded: {exc}", status=503)
        except EngineBroken:
            return PredictOutcome(error=BROKEN, status=503)
        except ValueError as exc:
            return PredictOutcome(error=str(exc), status=400)
        except Exception:
            logger.exception("generation failed for one request")
            return PredictOutcome(error=GENERATION_FAILED, status=503)
        generate_seconds = time.perf_counter() - start
        start = time.perf_counter()
        try:
            [prediction] = await asyncio.to_thread(self._masks, parse_generation(engine, request.prompt, generation))
        except Exception:
            logger.exception("mask decoding failed")
            return PredictOutcome(error=MASKS_FAILED, status=503)
        return PredictOutcome(prediction=prediction, timings={
            "generate": generate_seconds, "mask_decode": time.perf_counter() - start})

    @staticmethod
    def _conclude(engine: PaliGemmaEngine, request: PredictRequest, generation: Generation) -> Generation:
        budget = engine.row_spec(request.prompt, request.max_new_tokens).budget
        return engine.conclude(generation, budget=budget, cut_after=request.cut_after)

    async def stream_one(self, request: PredictRequest, timeout_s: float | None = None) -> AsyncIterator[dict]:
        """One request through its model's scheduler, as its row decodes: `{"text", "tokens", "logprobs"}`
        after each group of steps that chose tokens (`text`: what those tokens add to the answer's text,
        held back while a later token could still change it; `tokens`: each one's own text), then
        `{"outcome": PredictOutcome}`. Closing the generator early (its client left) cancels the request,
        which frees its slot."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_tokens(ids: list[int], logprobs: list[float]) -> None:  # the scheduler's thread
            loop.call_soon_threadsafe(queue.put_nowait, (ids, logprobs))

        task = asyncio.ensure_future(self.predict_one(request, timeout_s, on_tokens=on_tokens))
        task.add_done_callback(lambda _: queue.put_nowait(None))  # after every on_tokens call it follows
        engine = self.engines.get(self.adapters.get(request.model, request.model))
        text = StreamedText(engine) if engine is not None else None
        try:
            while (item := await queue.get()) is not None:
                ids, logprobs = item
                delta, pieces = await asyncio.to_thread(text.add, ids)  # the tokenizer: off the event loop
                yield {"text": delta, "tokens": pieces, "logprobs": logprobs}
            yield {"outcome": task.result()}
        finally:
            task.cancel()

    def _masks(self, parsed: ParsedGeneration):
        with self._decoder_lock:
            return attach_masks(self.decoder, [parsed])

    def predict(self, requests: list[PredictRequest]) -> list[PredictOutcome]:
        """One outcome per request, in order; never raises for a single request's failure."""
        outcomes = [PredictOutcome() for _ in requests]
        parsed: dict[int, ParsedGeneration] = {}
        start = time.perf_counter()
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            refused = self.refusal(request)
            if refused is not None:
                outcomes[index] = refused
            else:
                groups.setdefault(self.adapters.get(request.model, request.model), []).append(index)
        for model, indices in groups.items():
            self._generate(self.engines[model], [requests[i] for i in indices], indices, parsed, outcomes)
        generate_seconds = time.perf_counter() - start

        start = time.perf_counter()
        done = sorted(parsed)
        try:
            predictions = attach_masks(self.decoder, [parsed[i] for i in done])
        except Exception:  # the decoder is shared: a failure here is the server's, not a request's
            logger.exception("mask decoding failed for a batch of %d", len(done))
            for i in done:
                outcomes[i] = PredictOutcome(error=MASKS_FAILED, status=503)
            return outcomes
        decode_seconds = time.perf_counter() - start
        for i, prediction in zip(done, predictions):
            outcomes[i] = PredictOutcome(
                prediction=prediction, timings={"generate": generate_seconds, "mask_decode": decode_seconds}
            )
        return outcomes

    def _generate(self, engine, requests, indices, parsed, outcomes) -> None:
        """Generate a group; on failure split it in halves until the failing request stands alone."""
        try:
            results = parse_generations(
                engine,
                [r.image for r in requests],
                [r.prompt for r in requests],
                max_new_tokens=None if all(r.max_new_tokens is None for r in requests) else [
                    r.max_new_tokens or engine.row_spec(r.prompt).budget for r in requests
                ],
                adapters=[r.model if r.model in self.adapters else None for r in requests],
                cut_after=[r.cut_after for r in requests],
            )
        except Exception as exc:
            if len(requests) == 1:
                logger.exception("generation failed for one request")
                outcomes[indices[0]] = PredictOutcome(error=GENERATION_FAILED, status=503)
                return
            logger.warning("generation failed for a batch of %d (%s); retrying in halves", len(requests), exc)
            half = len(requests) // 2
            self._generate(engine, requests[:half], indices[:half], parsed, outcomes)
            self._generate(engine, requests[half:], indices[half:], parsed, outcomes)
            return
        parsed.update(zip(indices, results))


class StreamedText:
    """A streaming row's text, handed out in pieces that never need taking back: the text of all its
    tokens so far, less what was handed out already; nothing while the text ends in a partial character
    (a byte token waiting for the rest of its character) or would rewrite what was handed out."""

    def __init__(self, engine: PaliGemmaEngine) -> None:
        self.engine = engine
        self.ids: list[int] = []
        self.sent = ""

    def add(self, ids: list[int]) -> tuple[str, list[str]]:
        """(new text, each new token's own text)."""
        self.ids += ids
        text = self.engine.text_of(self.ids)
        pieces = self.engine.token_texts(ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return "", pieces
        delta, self.sent = text[len(self.sent):], text
        return delta, pieces
