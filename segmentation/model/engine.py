"""Batched greedy generation with PaliGemma 2 (transformers), grammar-constrained by default.

A batch of (image, prompt) pairs is padded on the left and generated together with the processor's
`token_type_ids` (the prefix is then attended bidirectionally, as in training): each row's output is
then token for token what it would be alone. Each row keeps its own budget and grammar state.

Three generation loops give the same tokens: `graph` (graph/decoder.py: a decode step of fixed shape over a
static KV cache with the grammar on the device, replayed as a CUDA graph per batch bucket on a GPU),
`fast` (our own loop, `fastgen.py`: in-place KV cache, no key/value head copies, one vision pass per
distinct picture) and `hf-generate` (transformers' `model.generate`, the engine before the fast loop;
kept as a setting and a benchmark baseline). A batch the graph engine cannot hold (a prompt longer
than its cache, more rows than its largest bucket) runs the `fast` loop.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import invariant
from .cpu import cpu_info, describe_cpu
from .fastgen import greedy_decode, grouped_attention_in
from .grammar import ObjectGrammar, RowSpec, Vocabulary
from .graph.decoder import STEP_PATHS, GraphCaptureError, GraphSettings, StaticDecoder
from .graph.device_grammar import trie_size
from .graph.prefill import choose_attention
from .images import model_input
from .prompts import DEFAULT_MAX_NEW_TOKENS, DEFAULT_OBJECTS_PER_CLASS, Prompt, max_new_tokens_for

logger = logging.getLogger(__name__)

# A label may be this many tokens longer than the longest class of its prompt (plurals, articles).
LABEL_SLACK_TOKENS = 8

# The generation loops `PaliGemmaEngine(generation=...)` accepts (see the module docstring).
GENERATIONS = ("graph", "fast", "hf-generate")


@dataclass
class Generation:
    """One row's output: the text and, per emitted token, its id, log-probability and text span; the
    tokens its prompt took (image tokens included), and why it ended: `stop` (its end token) or
    `length` (its budget, or a cut: `PaliGemmaEngine.conclude`)."""

    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    token_spans: list[tuple[int, int]]
    prompt_tokens: int = 0
    finish_reason: str = "stop"

    @property
    def token_texts(self) -> list[str]:
        """Each emitted token's piece of `text` (they add up to it)."""
        return [self.text[a:b] for a, b in self.token_spans]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def auto_dtype(device: str, generation: str, info: dict | None = None) -> tuple[torch.dtype, str]:
    """What `dtype="auto"` loads, and why in words: bfloat16 on a GPU; on a CPU bfloat16 only where it is
    native (AMX or AVX-512 BF16: cpu.py) and the graph engine can keep batched ≡ solo in it (it isolates
    rows, see `PaliGemmaEngine.isolate_rows`), else float32."""
    if not device.startswith("cpu"):
        return torch.bfloat16, "auto: bfloat16 on a GPU"
    info = info or cpu_info()
    if not info["native_bfloat16"]:
        return torch.float32, (f"auto: float32, this CPU has no native bfloat16 ({info['capability']}; "
                               f"PyTorch's reference bfloat16 kernels make the prefill about 4x float32's)")
    if generation != "graph":
        return torch.float32, (f"auto: float32, the {generation} engine cannot keep batched ≡ solo in bfloat16 "
                               f"(the graph engine can)")
    return torch.bfloat16, f"auto: bfloat16, native on this CPU ({info['via']})"


class PaliGemmaEngine:
    """A loaded PaliGemma model and processor that turn images and prompts into object text."""

    def __init__(
        self,
        model,
        processor,
        *,
        constrained: bool = True,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        objects_per_class: int = DEFAULT_OBJECTS_PER_CLASS,
        generation: str = "fast",
        share_images: bool = True,
        graph: GraphSettings | None = None,
        batch_invariant: bool = False,
    ):
        if generation not in GENERATIONS:
            raise ValueError(f"generation must be one of {', '.join(GENERATIONS)}, not {generation!r}")
        self.generation = generation
        self.share_images = share_images  # fast loop: one vision pass per distinct picture
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # right padding breaks batched == solo
        # A fast tokenizer sets its padding and truncation on its Rust object at every call: two threads
        # at once (the scheduler's and a request's) garble each other's inputs.
        self._tokenizer_lock = threading.RLock()
        self.constrained = constrained
        self.max_new_tokens = max_new_tokens
        self.objects_per_class = objects_per_class
        self.device = next(model.parameters()).device
        width = model.get_output_embeddings().weight.shape[0]
        self.vocab = Vocabulary(self.tokenizer, width).to(self.device)
        self.adapters: dict[str, str] = {}  # adapter id -> PEFT adapter name (see attach_adapters)
        # Adapters loaded while serving (load_adapter) and unloaded ones whose rows may still run
        # (retire_adapter; adapter id -> PEFT name until free_adapter).
        self.loaded_at_runtime: set[str] = set()
        self.retiring: dict[str, str] = {}
        self._runtime_names = itertools.count()
        self.graph_settings = graph or GraphSettings()
        # Why the weights have their dtype (from_pretrained says; /models shows it).
        self.dtype_reason = f"{str(self.model.dtype).removeprefix('torch.')} as given"
        # On the CPU: how the graph engine keeps rows apart ("any batch": each row prefilled alone; "fixed
        # batch": that and every step computing all slots), or None; and the start-up check that chose it.
        self.row_isolation: str | None = None
        self.row_check: dict | None = None
        # Batch-invariant arithmetic (invariant/, on CUDA) and, for the graph engine, one padded prompt
        # length for every row: a row's arithmetic is then the same in every batch and bucket.
        self.batch_invariant = batch_invariant
        if batch_invariant and self.device.type == "cuda":
            invariant.enable("cuda")  # before any graph capture: Triton compiles on first use
        self._decoder: StaticDecoder | None = None  # built (and its graphs captured) on first use
        # Decode steps by path (graph/decoder.py STEP_PATHS), and who else is told of each (the served
        # engine's /metrics): `listener(path, count)`, called on the thread that stepped, never syncing.
        self.steps: dict[str, int] = dict.fromkeys(STEP_PATHS, 0)
        self.step_listeners: list = []

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        device: str | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs,
    ) -> PaliGemmaEngine:
        """Load from a local directory written by `save_pretrained` (never from the hub).

        `dtype`: a torch dtype, `"float32"`, `"bfloat16"` or `"auto"`/None (`auto_dtype`: bfloat16 on a GPU,
        and on a CPU with native bfloat16 for the graph engine, float32 otherwise). On a CPU whose start-up
        check finds that rows cannot be kept apart in bfloat16 (`isolate_rows`), `auto` falls back to
        float32. `kwargs` go to the constructor.
        """
        from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} holds no PaliGemma model (no config.json)")
        device = device or default_device()
        if isinstance(dtype, str):
            dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        auto = dtype is None
        if device.startswith("cpu"):
            logger.info(describe_cpu())
        if auto:
            dtype, reason = auto_dtype(device, kwargs.get("generation", "fast"))
        else:
            reason = f"{str(dtype).removeprefix('torch.')}, as asked"
        start = time.perf_counter()
        processor = PaliGemmaProcessor.from_pretrained(model_dir, local_files_only=True)
        model = PaliGemmaForConditionalGeneration.from_pretrained(
            model_dir, dtype=dtype, local_files_only=True
        ).to(device)
        logger.info("loaded %s on %s (%s) in %.1fs", model_dir, device, dtype, time.perf_counter() - start)
        engine = cls(model, processor, **kwargs)
        engine.dtype_reason = reason
        if engine.isolate_rows:
            # Built now: the start-up check of this CPU's arithmetic (row_isolation) is then logged and in
            # /models from the start, and `auto` can still fall back.
            engine.decoder  # noqa: B018
            if auto and engine.row_isolation is None and engine.model.dtype == torch.bfloat16:
                logger.warning("bfloat16 cannot keep batched ≡ solo on this CPU (start-up check %s): float32",
                               engine.row_check)
                engine.model.to(torch.float32)
                engine._decoder = None
                engine.dtype_reason = ("auto: float32, this CPU's bfloat16 kernels compute a row differently "
                                       "alone and in a batch (start-up check)")
        logger.info("dtype %s", engine.dtype_reason)
        return engine

    def attach_adapters(self, adapters: dict[str, str | Path]) -> None:
        """Load LoRA adapters (adapter id -> directory) unmerged beside the base model, once. With runtime
        adapters (`GraphSettings.runtime_adapters`) also when there are none: every projection of the language
        model is wrapped now, before the graph engine captures its step (adapters.RESERVE_ADAPTER).

        PEFT names its adapters as modules: ids like `acme/v1.2` are not valid names, so each gets one.
        """
        from .adapters import attach_adapters

        names = {adapter_id: f"adapter_{i}" for i, adapter_id in enumerate(adapters)}
        self.model = attach_adapters(self.model, {names[a]: directory for a, directory in adapters.items()},
                                     reserve=self.graph_settings.runtime_adapters)
        self.adapters = names
        self._decoder = None  # its graphs hold the modules PEFT has just replaced

    @property
    def peft(self) -> bool:
        """Whether the model is wrapped by PEFT (adapters attached, or slots reserved for some): every row
        then names its adapter (`__base__` for the base)."""
        return hasattr(self.model, "peft_config")

    # --- adapters loaded and unloaded while serving ---------------------------------------------------
    # Called on the thread that runs this engine's steps (the scheduler's, between steps): the stacked
    # weights are written in place while no step reads them.

    def load_adapter(self, adapter_id: str, directory: str | Path, *, label: str | None = None,
                     base_id: str | None = None) -> dict:
        """Load a PEFT LoRA adapter into a free slot of the graph engine's stacked weights (graph/lora.py), in
        place: the graphs captured at start stay valid. Checked first (adapters.check_runtime_adapter: a
        LoRA of this base, rank and layers the slots hold); nothing changes unless it loads. Returns its place
        (`LoraSlots.describe`). Raises AdapterError (not usable here), SlotRefused (no slot fits; `full`: no
        free slot) or KeyError (the id is taken, or still unloading). `label` names the directory in messages."""
        from .adapters import AdapterError, check_runtime_adapter
        from .graph.lora import SlotRefused

        if not self.graph_settings.runtime_adapters or self.generation != "graph":
            raise AdapterError("this engine reserves no slots for adapters loaded while serving")
        if adapter_id in self.adapters or adapter_id in self.retiring:
            raise KeyError(adapter_id)
        lora = self.decoder.lora
        base = self.model.get_base_model()
        check_runtime_adapter(directory, base, covered=frozenset(lora.stacks), max_rank=lora.rank,
                              label=label or str(directory), base_id=base_id)
        if not lora.free_slots:
            raise SlotRefused(f"no free slot: all {lora.slot_count} hold adapters (SEG_MAX_ADAPTERS)", full=True)
        name = f"runtime_{next(self._runtime_names)}"
        self.model.load_adapter(str(directory), adapter_name=name)
        try:
            lora.place(name, self.decoder.lora_modules())
        except Exception:
            self.model.delete_adapter(name)
            raise
        self.adapters[adapter_id] = name
        self.loaded_at_runtime.add(adapter_id)
        logger.info("LoRA adapter %s loaded into slot %d", adapter_id, lora.slot_of[name])
        return lora.describe(name)

    def retire_adapter(self, adapter_id: str) -> str:
        """Stop new rows of an adapter loaded while serving; rows already admitted keep it until
        `free_adapter(name)` (its PEFT name, returned). KeyError: not loaded; ValueError: attached at start."""
        if adapter_id not in self.adapters:
            raise KeyError(adapter_id)
        if adapter_id not in self.loaded_at_runtime:
            raise ValueError(f"{adapter_id} was attached at start (SEG_ADAPTERS): restart without it to remove it")
        name = self.adapters.pop(adapter_id)
        self.loaded_at_runtime.discard(adapter_id)
        self.retiring[adapter_id] = name
        return name

    def free_adapter(self, name: str) -> None:
        """Zero a retired adapter's slot and drop its PEFT weights (no row may name it any more)."""
        self.decoder.lora.remove(name)
        self.model.delete_adapter(name)
        self.retiring = {a: n for a, n in self.retiring.items() if n != name}
        logger.info("LoRA adapter slot freed (%s)", name)

    def adapter_id_of(self, name: str) -> str | None:
        """The adapter id of a PEFT adapter name (also while it is unloading)."""
        return next((a for a, n in (*self.adapters.items(), *self.retiring.items()) if n == name), None)

    @property
    def image_size(self) -> int:
        """The side of the square picture the model reads (224 or 448 for PaliGemma 2 mix)."""
        return int(self.model.config.vision_config.image_size)

    def row_spec(self, prompt: Prompt, budget: int | None = None) -> RowSpec:
        """A row's own budget (grown with its classes, see `max_new_tokens_for`) and label length."""
        # Labels follow the mask codes with a leading space, as the classes are tokenized here.
        with self._tokenizer_lock:
            class_tokens = [tuple(self.tokenizer(" " + c, add_special_tokens=False).input_ids)
                            for c in prompt.classes]
        label_tokens = [len(t) for t in class_tokens]
        if budget is None:
            budget = max_new_tokens_for(
                label_tokens, prompt.task, objects_per_class=self.objects_per_class, ceiling=self.max_new_tokens
            )
        return RowSpec(
            prompt.task, budget, self.constrained, max_label_tokens=max(label_tokens) + LABEL_SLACK_TOKENS,
            allowed_labels=tuple(class_tokens) if prompt.labels_from_prompt else None,
        )

    def generate(
        self,
        images: list[Image.Image],
        prompts: list[Prompt],
        *,
        max_new_tokens: list[int] | None = None,
        adapters: list[str | None] | None = None,
    ) -> list[Generation]:
        """Greedy generation for a batch; one `Generation` per (image, prompt), in order.

        `max_new_tokens` overrides each row's budget (benchmarks force a token count with it).
        `adapters` names each row's LoRA adapter (an id given to `attach_adapters`; None: the base).
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        if not images:
            return []
        rows = [self.row_spec(p, b) for p, b in zip(prompts, max_new_tokens or [None] * len(prompts))]
        inputs = self.prepare(images, prompts)
        prompt_length = inputs["input_ids"].shape[1]
        forward_kwargs = self.forward_kwargs(prompts, adapters)
        if self.generation == "graph" and self._fits_graph(rows, prompt_length):
            decoded = self._graph_decode(inputs, rows, forward_kwargs)
            generations = [self._row(d.token_ids, d.token_logprobs) for d in decoded]
        else:
            grammar = ObjectGrammar(self.vocab, rows, prompt_length)
            steps = max(r.budget for r in rows) + 1  # +1: room for the end token a row's budget forces
            generated = self._decode(inputs, grammar, steps, forward_kwargs).cpu()
            logprobs = grammar.finish(generated)
            generations = [self._row(ids, lps) for ids, lps in zip(generated.tolist(), logprobs)]
        for generation, tokens in zip(generations, inputs["attention_mask"].sum(-1).tolist()):
            generation.prompt_tokens = int(tokens)
        return generations

    @property
    def fixed_prompt_length(self) -> int:
        """Image tokens plus the prompt tokens the graph engine's cache holds (GraphSettings.prompt_tokens)."""
        return int(self.processor.image_seq_length) + self.graph_settings.prompt_tokens

    @property
    def isolate_rows(self) -> bool:
        """Whether the graph engine keeps rows apart on this CPU (`row_isolation`): in bfloat16, where a
        rounding that differs in the last bit of one activation changes later tokens (measured on the
        medium fixture: 7 of 8 rows equal alone without it, 8 of 8 bit for bit with it), and in float32
        when batch-invariant answers are asked for (`batch_invariant`: the same bits in any batch)."""
        return (self.device.type == "cpu" and self.generation == "graph"
                and (self.batch_invariant or self.model.dtype == torch.bfloat16))

    def invariance(self) -> str:
        """Where this engine's batched answers equal solo answers, in one sentence (README, /models)."""
        dtype = str(self.model.dtype).removeprefix("torch.")
        if self.device.type != "cpu" or not (self.isolate_rows or self.model.dtype != torch.float32):
            return invariant.describe(self.device, self.model.dtype)
        if self.isolate_rows and self._decoder is None:
            return f"batched ≡ solo on cpu in {dtype}: rows are isolated once the engine has started (check pending)"
        if self.row_isolation == "any batch":
            return (f"batched ≡ solo bit for bit on cpu in {dtype}: each request is prefilled alone, and this CPU's "
                    f"kernels compute a decode-step row the same at any batch size (checked at start)")
        if self.row_isolation == "fixed batch":
            return (f"batched ≡ solo bit for bit on cpu in {dtype}: each request is prefilled alone and every "
                    f"decode step computes all {self._decoder.slots} slots over the whole cache, and this CPU's "
                    f"kernels compute a row the same in any slot (checked at start)")
        why = ("only the graph engine isolates rows" if self.generation != "graph" else
               "this CPU's kernels compute a row differently alone and in a batch (start-up check)")
        return f"batched ≡ solo not guaranteed on cpu in {dtype}: {why}"

    def describe(self) -> dict:
        """What /models shows of this engine: device, dtype and why, where batched ≡ solo holds, its decode
        graphs, and on a CPU the processor (native bfloat16 or not)."""
        described = {"device": str(self.device), "dtype": str(self.model.dtype).removeprefix("torch."),
                     "dtype_reason": self.dtype_reason, "batched_equals_solo": self.invariance(),
                     "graphs": self.graph_status()}
        if self.device.type == "cpu":
            info = cpu_info()
            described["cpu"] = {key: info[key] for key in ("model", "capability", "native_bfloat16", "via")}
            described["cpu"]["row_isolation"] = self.row_isolation
        return described

    @property
    def decoder(self) -> StaticDecoder:
        """The graph engine's static buffers and step, built on first use (its CUDA graphs captured then,
        and captured anew when the batch-invariant mode has changed since: a graph holds its mode's kernels).

        Raises GraphCaptureError when graphs are required (`GraphSettings.require`) and a bucket failed.
        """
        if self._decoder is None:
            settings = self.graph_settings
            image_tokens = int(self.processor.image_seq_length)
            model = self.model.get_base_model() if self.peft else self.model
            self._decoder = StaticDecoder(
                model, self.vocab, pad_id=self.tokenizer.pad_token_id,
                length=image_tokens + settings.prompt_tokens + self.max_new_tokens + 1,
                buckets=settings.buckets, sync_every=settings.sync_every,
                use_graphs=True if settings.require else settings.use_graphs, compile=settings.compile,
                prefill=choose_attention(settings.prefill_attention, self.device),
            )
            if self.peft:
                lora = self._decoder.attach_lora(
                    list(self.adapters.values()), max_adapters=settings.max_adapters, max_rank=settings.max_lora_rank,
                    vision_hooks=lambda names: self.model._enable_peft_forward_hooks(adapter_names=names),
                    reserve=settings.runtime_adapters)
                for adapter_id, name in self.adapters.items():
                    if name in lora.refused:
                        logger.warning("LoRA adapter %s has no slot in the graph engine's step (%s): its rows step "
                                       "eagerly through PEFT's hooks", adapter_id, lora.refused[name])
            self._decoder.on_steps = self._count_steps
            if self.batch_invariant and self.device.type != "cpu":
                self._decoder.fixed_span = True  # every step attends over the whole cache
            if self.isolate_rows:
                self._isolate_rows()
            logger.info("graph engine: %d slots x %d cache positions, buckets %s, %.1f MiB of buffers reserved; "
                        "prefill attention %s (%s)", self._decoder.slots, self._decoder.length, self._decoder.buckets,
                        self._decoder.reserved_bytes() / 2**20, self._decoder.prefiller.kernel,
                        self._decoder.prefiller.choice.why)
            self._capture()
        elif self._decoder.graphs and self._decoder.graph_mode != invariant.enabled_kinds():
            logger.info("batch-invariant mode changed: capturing the decode graphs again")
            self._capture()
        return self._decoder

    def _isolate_rows(self) -> None:
        """Check this CPU's arithmetic (`StaticDecoder.row_arithmetic`) and isolate rows the cheapest way
        that it shows to hold: each row prefilled alone, and, unless the kernels compute a row the same
        at any batch size, every step computing all slots."""
        decoder = self._decoder
        start = time.perf_counter()
        self.row_check = decoder.row_arithmetic()
        if self.row_check["any_batch"]:
            self.row_isolation = "any batch"
        elif self.row_check["fixed_batch"]:
            self.row_isolation = "fixed batch"
        if self.row_isolation is not None:
            decoder.isolate_rows(fixed_batch=self.row_isolation == "fixed batch")
        logger.info("row isolation on cpu in %s: %s (check %s in %.1fs)", self.model.dtype, self.row_isolation,
                    self.row_check, time.perf_counter() - start)

    def _capture(self) -> None:
        decoder = self._decoder
        # Adapters need no context: the step calls wrapped layers' base layers and adds the stacked updates.
        decoder.capture()
        if self.graph_settings.require and decoder.capture_failures:
            failed = "; ".join(f"bucket {b}: {r}" for b, r in sorted(decoder.capture_failures.items()))
            raise GraphCaptureError(f"CUDA graphs are required (SEG_REQUIRE_GRAPHS) and their capture failed "
                                    f"on {self.device} ({failed})")

    def _count_steps(self, path: str, count: int) -> None:
        if count <= 0:
            return
        self.steps[path] += count
        for listener in self.step_listeners:
            listener(path, count)

    def graph_status(self) -> dict:
        """Whether this engine's decode steps replay CUDA graphs, for which buckets, and why not (/models).

        Never builds the decoder (that captures graphs): before the first generation `built` is False.
        """
        decoder = self._decoder
        status = {"engine": self.generation, "built": decoder is not None, "captured": False,
                  "buckets": [], "eager_buckets": [], "failures": {}}
        if self.generation != "graph":
            return {**status, "why": f"the {self.generation} engine has no decode graphs"}
        if decoder is None:
            return {**status, "eager_buckets": list(self.graph_settings.buckets)}
        status["prefill"] = decoder.prefiller.describe()
        status.update(captured=bool(decoder.graphs), buckets=sorted(decoder.graphs),
                      eager_buckets=list(decoder.eager_buckets),
                      failures={str(b): r for b, r in sorted(decoder.capture_failures.items())})
        if not decoder.use_graphs:
            status["why"] = f"no CUDA graphs on {self.device.type}: every step runs eagerly"
        elif decoder.capture_failures:
            status["why"] = "capture failed for some buckets: those steps run eagerly"
        return status

    def adapter_status(self, adapter_id: str) -> dict | None:
        """Where an attached adapter's rows run in the graph engine's step (graph/lora.py `describe`), or None
        before the decoder is built (or without stacked adapters)."""
        name = self.adapters.get(adapter_id)  # None: unloaded meanwhile
        if self._decoder is None or self._decoder.lora is None or name is None:
            return None
        return self._decoder.lora.describe(name)

    def slot_status(self) -> dict | None:
        """The stacked adapter weights' slots: how many, their rank, which are free (None: no stacks)."""
        if self._decoder is None or self._decoder.lora is None:
            return None
        lora = self._decoder.lora
        return {"slots": lora.slot_count, "slot_rank": lora.rank, "free": len(lora.free_slots),
                "runtime_adapters": self.graph_settings.runtime_adapters}

    def _fits_graph(self, rows: list[RowSpec], prompt_length: int) -> bool:
        decoder = self.decoder
        longest = max(r.budget for r in rows) + 1
        return (len(rows) <= decoder.slots and prompt_length + longest <= decoder.length
                and max(map(trie_size, rows)) <= decoder.edges_per_row)

    def _graph_decode(self, inputs, rows: list[RowSpec], forward_kwargs: dict):
        names = forward_kwargs.get("adapter_names")
        context, graphs = self.graph_context(names)

        def row_context(row: int):  # one row prefilled alone (row isolation): its own adapter's hooks
            return self.graph_context(None if names is None else names[row:row + 1])[0](1)

        return self.decoder.decode(inputs, rows, share_images=self.share_images and names is None, adapters=names,
                                   context=context, graphs=graphs, row_context=row_context)

    def graph_context(self, adapter_names: list[str] | None):
        """How the graph engine runs rows with these PEFT adapter names (None: no adapters attached):
        `(context(rows) -> context manager, graphs)`. Rows past the list (idle bucket rows) are base rows.

        Base rows and rows of adapters with a slot in the decoder's stacked weights (graph/lora.py) run the
        same steps, graphs included; a row of an adapter without one (a LoRA variant, a rank above the slot's,
        no free slot) sends its whole batch through PEFT's per-row hooks, stepping eagerly (`peft`)."""
        if adapter_names is None or self.decoder.lora is None or self.decoder.lora.stackable(adapter_names):
            return (lambda count: contextlib.nullcontext()), True
        from .adapters import BASE_ROW

        def per_row_adapters(count: int):
            # PEFT's per-row hooks need one name per row of each call.
            names = list(adapter_names[:count]) + [BASE_ROW] * (count - len(adapter_names))
            return self.model._enable_peft_forward_hooks(adapter_names=names)

        return per_row_adapters, False

    def prepare(self, images: list[Image.Image], prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        """The model's inputs on its device: `input_ids`, `attention_mask`, `token_type_ids` [B, L] (left
        padded to the longest prompt) and `pixel_values` [B, 3, S, S] in the model's dtype."""
        pictures = [model_input(image, self.image_size) for image in images]
        texts = ["<image>" + p.text for p in prompts]
        padding = {"padding": "longest"}
        if self.batch_invariant and self.generation == "graph" and self.device.type != "cpu":
            # Every prompt padded to the length the graph engine's cache holds (longer ones run as they are).
            # (On the CPU each row is prefilled alone instead: `isolate_rows`.)
            padding = {"padding": "max_length", "max_length": self.fixed_prompt_length}
        with self._tokenizer_lock:
            inputs = self.processor(images=pictures, text=texts, return_tensors="pt", **padding)
        inputs.pop("labels", None)  # only for training; the processor adds it with token_type_ids
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def forward_kwargs(self, prompts: list[Prompt], adapters: list[str | None] | None = None) -> dict:
        """Extra keyword arguments for every forward call of this batch: with adapters attached (a PEFT
        model), every row names its adapter (`__base__` for the base), else PEFT applies the active one."""
        if self.peft:
            return {"adapter_names": self._adapter_names(adapters or [None] * len(prompts))}
        if adapters and any(adapters):
            raise ValueError(f"no adapters are attached; asked for {sorted(set(filter(None, adapters)))}")
        return {}

    def _adapter_names(self, adapters: list[str | None]) -> list[str]:
        from .adapters import BASE_ROW

        names = {**self.retiring, **self.adapters}  # an unloading adapter's rows still run (the scheduler's)
        unknown = sorted({a for a in adapters if a and a not in names})
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; attached: {sorted(self.adapters)}")
        return [names[a] if a else BASE_ROW for a in adapters]

    def _decode(self, inputs, grammar: ObjectGrammar, steps: int, forward_kwargs: dict) -> torch.Tensor:
        """New token ids [B, <= steps] after the prompt: the fast loop (also for a batch the graph engine
        cannot hold), or transformers' `generate` for `hf-generate`."""
        eos_id, pad_id = self.vocab.eos_id, self.tokenizer.pad_token_id
        if self.generation in ("fast", "graph"):
            generated = self._fast_decode(inputs, grammar, steps, forward_kwargs)
            self._count_steps("fast", generated.shape[1] - 1)  # the first token came from the prefill
            return generated
        with torch.inference_mode():
            sequences = self.model.generate(
                **inputs, **forward_kwargs, max_new_tokens=steps, do_sample=False, num_beams=1,
                logits_processor=[grammar], eos_token_id=eos_id, pad_token_id=pad_id,
            )
        generated = sequences[:, inputs["input_ids"].shape[1]:]
        self._count_steps("hf-generate", generated.shape[1] - 1)
        return generated

    def _fast_decode(self, inputs, grammar: ObjectGrammar, steps: int, forward_kwargs: dict) -> torch.Tensor:
        model, extra, hooks = self.model, dict(forward_kwargs), contextlib.nullcontext()
        adapter_names = extra.pop("adapter_names", None)
        if adapter_names is not None:
            # As PeftModel.generate does: PEFT's per-row adapter hooks around every call of the base
            # model (the vision tower's too), one row of `adapter_names` per batch row, so no picture
            # is shared between rows.
            hooks = self.model._enable_peft_forward_hooks(adapter_names=adapter_names)
            model = self.model.get_base_model()
        with hooks, grouped_attention_in(model):
            return greedy_decode(
                model, inputs, grammar, max_new_tokens=steps, eos_id=self.vocab.eos_id,
                pad_id=self.tokenizer.pad_token_id, share_images=self.share_images and adapter_names is None,
                forward_kwargs=extra,
            )

    def _row(self, ids: list[int], logprobs: list[float]) -> Generation:
        with self._tokenizer_lock:
            return self._generation(ids, logprobs)

    def _generation(self, ids: list[int], logprobs: list[float]) -> Generation:
        if self.vocab.eos_id in ids:
            ids = ids[: ids.index(self.vocab.eos_id)]
        logprobs = logprobs[: len(ids)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Generation(text, ids, logprobs, self._spans(ids, text))

    def conclude(self, generation: Generation, *, budget: int, cut_after: int | None = None) -> Generation:
        """A finished row with its finish reason: cut after `cut_after` tokens when it has more (OpenAI's
        `max_tokens`: the same tokens as without the cut, up to it), `length` when a cut or its budget
        ended it, else `stop`."""
        if cut_after is not None and len(generation.token_ids) > cut_after:
            cut = self._row(generation.token_ids[:cut_after], generation.token_logprobs[:cut_after])
            cut.prompt_tokens, cut.finish_reason = generation.prompt_tokens, "length"
            return cut
        generation.finish_reason = "length" if len(generation.token_ids) >= budget else "stop"
        return generation

    def text_of(self, ids: list[int]) -> str:
        """The text of emitted token ids (a row's tokens so far, while it streams)."""
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (a streamed row's new tokens)."""
        with self._tokenizer_lock:
            return [self.tokenizer.decode([i], skip_special_tokens=True) for i in ids]

    def _spans(self, ids: list[int], text: str) -> list[tuple[int, int]]:
        """Each token's character range in `text` (empty for tokens that decode to nothing)."""
        pieces = [self.tokenizer.decode([i], skip_special_tokens=True) for i in ids]
        if "".join(pieces) != text:
            # Multi-byte characters split across byte tokens only decode together: use prefixes.
            ends = [len(self.tokenizer.decode(ids[: k + 1], skip_special_tokens=True)) for k in range(len(ids))]
            pieces = [" " * (end - start) for start, end in zip([0] + ends[:-1], ends)]
        spans, position = [], 0
        for piece in pieces:
            spans.append((position, position + len(piece)))
            position += len(piece)
        return spans
