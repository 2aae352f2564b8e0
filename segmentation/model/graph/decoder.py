"""A PaliGemma 2 decode step of fixed shape over a static KV cache, replayable as a CUDA graph.

The `fast` loop (fastgen.py) grows its cache and keeps the grammar on the host, so every step has new
shapes and a device-to-host copy: on a GPU the card then waits on Python and kernel launches (25 ms a
step for the 3B model on an H200, docs/benchmarks.md). Here everything a step touches lives in
tensors allocated once, sized for the largest batch (`slots`) and the longest sequence (`length`):

- the keys and values of every layer, `[slots, Hkv, length, D]`; each row writes its new key at its
  own `write_index` and attends over the whole cache through a mask (its padding, the future, and for
  Gemma 2's sliding layers the keys older than the window are masked, as transformers masks them);
- each row's next input token, position, first valid cache index, grammar state (device_grammar.py),
  and the output buffers its chosen tokens and their log-probabilities go to.

A step for the first `b` slots (`b` one of the configured bucket sizes) reads and writes only views of
those tensors and never synchronises with the host, so on CUDA it is captured once per bucket with
`torch.cuda.CUDAGraph` and replayed. The host looks at the rows every `sync_every` steps to stop once
all are finished. On the CPU the same step runs eagerly (or under `torch.compile`, one graph a bucket).

The model code is transformers' own modules (norms, projections, MLP, rotary embedding); only the
attention over the static cache is ours (`fastgen.grouped_attention`, Gemma 2's eager arithmetic).
The prefill is ours too (prefill.py: flex_attention or the eager kernel, keys written straight into the
static cache). LoRA adapters run inside the step from stacked static weights (lora.py), one slot index per
row, so rows of several adapters and of the base share one step (and one CUDA graph).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from transformers.models.gemma2.modeling_gemma2 import apply_rotary_pos_emb

from .. import invariant
from ..fastgen import grouped_attention, image_features
from ..grammar import RowSpec, Vocabulary
from .device_grammar import (
    DEFAULT_EDGES_PER_ROW,
    DONE,
    GrammarTables,
    RowConstants,
    RowState,
    advance,
    allowed_tokens,
    compile_rows,
    copy_rows,
    initial_state,
)
from .lora import DEFAULT_MAX_ADAPTERS, DEFAULT_MAX_RANK, LAYER_LINEARS, LoraSlots, is_lora_layer
from .prefill import AttentionChoice, Prefill

logger = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)
# The host checks for finished rows every this many steps (one device-to-host copy each time). On the
# CPU a check costs next to nothing and steps past the last row's end are pure waste: every step (on
# the medium model, checking every 8 steps ran 41 steps where 35 were needed: +17 % time at batch 8).
# On a GPU a check drains the queue of replays; 8 is a guess until measured (docs/benchmarks.md).
DEFAULT_SYNC_EVERY = {"cpu": 1, "cuda": 8}

# How a decode step ran (`seg_engine_steps_total{path}` on /metrics): a replayed CUDA graph, the fixed-shape
# step run eagerly (no graph for the bucket: the CPU, a failed capture), rows stepped eagerly through PEFT's
# per-row adapter hooks, the `fast` loop, transformers' `generate`.
STEP_PATHS = ("graph", "fixed", "peft", "fast", "hf-generate")


class GraphCaptureError(RuntimeError):
    """CUDA graphs were required (`GraphSettings.require`, SEG_REQUIRE_GRAPHS) and a bucket's capture failed."""


@dataclass(frozen=True)
class GraphSettings:
    """How the graph engine sizes its buffers and when the host looks at the rows."""

    buckets: tuple[int, ...] = DEFAULT_BUCKETS  # batch sizes with a step (and a CUDA graph) of their own
    sync_every: int | None = None  # steps between the host's checks for finished rows (None: per device)
    prompt_tokens: int = 128  # text tokens of a prompt the cache holds beside the image tokens
    compile: bool = False  # torch.compile the step (CPU; on CUDA the graphs already remove the overhead)
    use_graphs: bool | None = None  # capture CUDA graphs (None: on CUDA)
    # Every bucket captured or the engine refuses to start (GraphCaptureError): SEG_REQUIRE_GRAPHS. Implies
    # use_graphs, on any device (on a CPU the capture fails, with torch's reason).
    require: bool = False
    prefill_attention: str = "auto"  # the prefill's kernel: auto, flex, eager (prefill.py; SEG_PREFILL_ATTENTION)
    max_adapters: int = DEFAULT_MAX_ADAPTERS  # at most this many LoRA slots in the step (lora.py; SEG_MAX_ADAPTERS)
    max_lora_rank: int = DEFAULT_MAX_RANK  # of at most this rank (SEG_MAX_LORA_RANK)
    # Reserve the caps (free slots, stacks on every language-model projection) for adapters loaded while
    # serving (engine.load_adapter; SEG_RUNTIME_ADAPTERS).
    runtime_adapters: bool = False


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int:
    """The smallest configured bucket that holds `batch` rows."""
    for size in buckets:
        if size >= batch:
            return size
    raise ValueError(f"{batch} rows exceed the largest bucket ({buckets[-1]})")


@dataclass
class Decoded:
    """One row's result: emitted ids up to and excluding the end token, and each one's log-probability."""

    token_ids: list[int]
    token_logprobs: list[float]


def one_row(inputs: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    """Row `row` of the processor's left-padded batch as the processor makes it alone: its padding cut
    off, its own picture."""
    length = int(inputs["attention_mask"][row].sum())
    alone = {name: inputs[name][row:row + 1, inputs[name].shape[1] - length:]
             for name in ("input_ids", "attention_mask", "token_type_ids")}
    alone["pixel_values"] = inputs["pixel_values"][row:row + 1]
    return alone


def _view(obj, rows: slice):
    return type(obj)(**{name: value[rows] for name, value in vars(obj).items()})


class StaticDecoder:
    """Static buffers, the fixed-shape step, prefill into slots, and (on CUDA) one graph per bucket.

    `model` is a `PaliGemmaForConditionalGeneration` (the base model when LoRA adapters are attached: its
    wrapped layers are called through their `base_layer`, the adapters come from `attach_lora`'s stacks).
    `slots`: the largest bucket; `length`: cache positions per row (prompt + budget + 1 must fit);
    `prefill`: the prefill's attention kernel (prefill.py `choose_attention`; None: the eager kernel).
    """

    def __init__(
        self,
        model,
        vocab: Vocabulary,
        *,
        pad_id: int,
        length: int,
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
        sync_every: int | None = None,
        edges_per_row: int = DEFAULT_EDGES_PER_ROW,
        use_graphs: bool | None = None,
        compile: bool = False,
        prefill: AttentionChoice | None = None,
    ):
        self.model = model
        self.buckets = tuple(sorted(buckets))
        self.slots = self.buckets[-1]
        self.length = length
        self.edges_per_row = edges_per_row
        self.pad_id = pad_id
        self.eos_id = vocab.eos_id
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.sync_every = max(1, sync_every or DEFAULT_SYNC_EVERY.get(self.device.type, 8))
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        text = model.config.get_text_config()
        self.text_config = text
        self.window = getattr(text, "sliding_window", None)
        self.sliding = [t == "sliding_attention" for t in getattr(text, "layer_types", [])] or (
            [False] * text.num_hidden_layers)
        self.final_softcap = getattr(text, "final_logit_softcapping", None)
        self.tables = GrammarTables(vocab, self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0
        self.capture_failures: dict[int, str] = {}  # bucket -> why its capture failed (it steps eagerly)
        self.capture_report: dict[int, dict] = {}  # bucket -> seconds and graph-pool MiB of its capture
        # The batch-invariant mode (invariant.enabled_kinds()) the graphs were captured under: they hold
        # that mode's kernels, so they are never replayed under another (see run_step).
        self.graph_mode: frozenset[str] = frozenset()
        self._mode_warned = False
        self._graph_pool = None
        self.last_timing: dict = {}
        # Decode steps run, by path (STEP_PATHS), counted on the host per run_step call (no device sync);
        # `on_steps(path, count)` is told of each (the engine's metrics).
        self.steps: dict[str, int] = dict.fromkeys(STEP_PATHS, 0)
        self.on_steps = None
        # Cache positions a step attends over. Graphs and compiled steps need one shape: the whole
        # cache. An eager step (the CPU) may attend over the part a generation can reach (`fit_span`).
        self.span = length
        self.fixed_span = self.use_graphs or compile
        # Row isolation on the CPU (engine.py decides, `isolate_rows`): every prompt prefilled alone at
        # its own length (`per_row_prefill`: its shapes then never depend on who is admitted with it), and
        # with `fixed_batch` every step computing all `slots` rows over the whole cache (its shapes then
        # never depend on who shares the running batch either).
        self.per_row_prefill = False
        self.fixed_batch = False
        # LoRA: stacked adapters (attach_lora) and whether a call goes through PEFT's hooks instead (rows of
        # adapters the stacks cannot hold: the wrapped layers are then called as they are).
        self.lora: LoraSlots | None = None
        self.vision_hooks = None  # names -> context manager around the vision tower (PEFT's per-row hooks)
        self.through_peft = False
        self._stacks: dict[int, object] = {}
        with torch.inference_mode():
            self._allocate(text)
        self.prefiller = Prefill(self, prefill or AttentionChoice("eager", "default"))
        self._step_fn = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step

    def _allocate(self, text) -> None:
        slots, device = self.slots, self.device
        shape = (slots, text.num_key_value_heads, self.length, text.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(text.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(text.num_hidden_layers)]
        longs = {name: torch.zeros(slots, dtype=torch.long, device=device)
                 for name in ("token", "position", "write_index", "start")}
        self.token, self.position = longs["token"], longs["position"]
        self.write_index, self.start = longs["write_index"], longs["start"]
        self.finished = torch.ones(slots, dtype=torch.bool, device=device)
        self.out_tokens = torch.full((slots, self.length), self.pad_id, dtype=torch.long, device=device)
        self.out_logprobs = torch.zeros((slots, self.length), dtype=torch.float32, device=device)
        idle = [RowSpec("detect", 0)] * slots
        self.rows: RowConstants = compile_rows(idle, edges_per_row=self.edges_per_row, device=device)
        self.state: RowState = initial_state(slots, device)
        self.state.state.fill_(DONE)
        self.adapter_slot = torch.zeros(slots, dtype=torch.long, device=device)  # LoRA slot per row (0: base)
        self.positions_in_cache = torch.arange(self.length, device=device)

    def reserved_bytes(self) -> int:
        """Bytes of the static buffers (the KV cache dominates) and of the stacked LoRA weights."""
        tensors = [*self.keys, *self.values, self.out_tokens, self.out_logprobs]
        return sum(t.numel() * t.element_size() for t in tensors) + (self.lora.reserved_bytes() if self.lora else 0)

    # --- LoRA adapters --------------------------------------------------------------------------

    def attach_lora(self, adapters: list[str], *, max_adapters: int = DEFAULT_MAX_ADAPTERS,
                    max_rank: int = DEFAULT_MAX_RANK, vision_hooks=None, reserve: bool = False) -> LoraSlots:
        """Stack the PEFT adapters `adapters` (names, in slot order) of this decoder's wrapped model into static
        tensors (lora.py); `vision_hooks(names)` wraps the vision tower of a prefill with adapter rows.
        `reserve`: stacks of the caps for every wrapped layer (adapters loaded later: `LoraSlots.place`)."""
        lm = self.model.model.language_model
        modules = self.lora_modules()
        embedding = frozenset(getattr(lm.embed_tokens, "lora_embedding_A", {}).keys())
        with torch.inference_mode():
            self.lora = LoraSlots(modules, adapters, max_adapters=max_adapters, max_rank=max_rank,
                                  embedding_adapters=embedding, reserve=reserve)
        self._stacks = {id(modules[name]): stack for name, stack in self.lora.stacks.items()}
        self.vision_hooks = vision_hooks
        return self.lora

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        """The linear layers a step calls, by name: each layer's projections and the output layer."""
        lm = self.model.model.language_model
        modules = {f"model.language_model.layers.{i}.{part}.{name}": getattr(getattr(layer, part), name)
                   for i, layer in enumerate(lm.layers) for part, names in (("self_attn", LAYER_LINEARS[:4]),
                                                                            ("mlp", LAYER_LINEARS[4:]))
                   for name in names}
        return {**modules, "lm_head": self.model.lm_head}

    def linear(self, module: torch.nn.Module, x: torch.Tensor, slot: torch.Tensor | None) -> torch.Tensor:
        """`module(x)` for rows x [b, n, in] whose LoRA slots are `slot` [b]: a PEFT-wrapped layer is called as
        its base layer plus its stacked update (lora.py), unless the call goes through PEFT's hooks."""
        if self.through_peft or not is_lora_layer(module):
            return module(x)
        out = module.base_layer(x)
        stack = self._stacks.get(id(module))
        if stack is None or slot is None:
            return out
        return out + stack.delta(x, self.lora.onehot[slot], stack.scale[slot])

    @contextlib.contextmanager
    def peft_calls(self, on: bool = True):
        """Inside, with `on`, wrapped layers are called as they are (PEFT's hooks around them pick adapters)."""
        previous, self.through_peft = self.through_peft, on or self.through_peft
        try:
            yield
        finally:
            self.through_peft = previous

    def mlp(self, mlp: torch.nn.Module, x: torch.Tensor, slot: torch.Tensor | None) -> torch.Tensor:
        """Gemma 2's MLP (`down(act(gate(x)) * up(x))`) with each projection through `linear`."""
        linear = self.linear
        return linear(mlp.down_proj, mlp.act_fn(linear(mlp.gate_proj, x, slot)) * linear(mlp.up_proj, x, slot), slot)

    # --- the step -------------------------------------------------------------------------------

    def _forward(self, batch: int) -> torch.Tensor:
        """Float32 logits [batch, V] of each row's `token` at its `position`, written to its `write_index`."""
        lm = self.model.model.language_model
        tokens, at, span = self.token[:batch, None], self.write_index[:batch], self.span
        hidden = lm.embed_tokens(tokens)  # [b, 1, H], scaled as Gemma 2 scales it
        cos, sin = lm.rotary_emb(hidden, self.position[:batch, None])
        keys_at = self.positions_in_cache[None, :span]
        valid = (keys_at >= self.start[:batch, None]) & (keys_at <= at[:, None])
        lowest = torch.finfo(self.dtype).min
        full_mask = torch.where(valid, 0.0, lowest).to(self.dtype)[:, None, None, :]
        sliding_mask = full_mask
        if self.window is not None:
            recent = keys_at > (at[:, None] - self.window)
            sliding_mask = torch.where(valid & recent, 0.0, lowest).to(self.dtype)[:, None, None, :]
        write = at.view(batch, 1, 1, 1)
        slot = self.adapter_slot[:batch] if self.lora is not None else None
        linear = self.linear
        for index, layer in enumerate(lm.layers[: self.text_config.num_hidden_layers]):
            attention = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            query = linear(attention.q_proj, x, slot).view(batch, 1, -1, attention.head_dim).transpose(1, 2)
            key = linear(attention.k_proj, x, slot).view(batch, 1, -1, attention.head_dim).transpose(1, 2)
            value = linear(attention.v_proj, x, slot).view(batch, 1, -1, attention.head_dim).transpose(1, 2)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            keys, values = self.keys[index][:batch, :, :span], self.values[index][:batch, :, :span]
            keys.scatter_(2, write.expand(-1, key.shape[1], 1, key.shape[3]), key)
            values.scatter_(2, write.expand(-1, value.shape[1], 1, value.shape[3]), value)
            out, _ = grouped_attention(
                attention, query, keys, values, sliding_mask if self.sliding[index] else full_mask,
                scaling=attention.scaling, softcap=attention.attn_logit_softcapping,
            )
            out = linear(attention.o_proj, out.reshape(batch, 1, -1), slot)
            hidden = residual + layer.post_attention_layernorm(out)
            residual = hidden
            out = self.mlp(layer.mlp, layer.pre_feedforward_layernorm(hidden), slot)
            hidden = residual + layer.post_feedforward_layernorm(out)
        logits = linear(self.model.lm_head, lm.norm(hidden), slot)[:, -1]
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()

    def _select(self, logits: torch.Tensor, rows: RowConstants, state: RowState, finished: torch.Tensor,
                out_tokens: torch.Tensor, out_logprobs: torch.Tensor) -> torch.Tensor:
        """Grammar mask, argmax, outputs and state advance for logits [b, V]; returns the tokens [b].

        Every tensor argument is updated in place (they are views of the static buffers, or copies
        that the caller writes back).
        """
        logprobs = torch.log_softmax(logits, dim=-1)
        allowed = allowed_tokens(self.tables, rows, state)
        tokens = torch.argmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        tokens = torch.where(finished, self.pad_id, tokens)
        column = state.generated.clamp(max=out_tokens.shape[1] - 1)[:, None]
        out_tokens.scatter_(1, column, tokens[:, None])
        out_logprobs.scatter_(1, column, logprobs.gather(1, tokens[:, None]))
        finished |= tokens == self.eos_id
        advance(self.tables, rows, state, tokens)
        return tokens

    def _step(self, batch: int) -> None:
        """One decode step for the first `batch` slots: no host synchronisation, fixed shapes."""
        logits = self._forward(batch)
        rows = slice(0, batch)
        tokens = self._select(logits, _view(self.rows, rows), _view(self.state, rows), self.finished[rows],
                              self.out_tokens[rows], self.out_logprobs[rows])
        self.token[rows].copy_(tokens)
        self.position[rows].add_(1)
        # Finished and idle rows keep stepping with the rest: keep their writes inside the cache.
        self.write_index[rows].copy_((self.write_index[rows] + 1).clamp(max=self.span - 1))

    def batch_for(self, rows: int) -> int:
        """The batch a step for the first `rows` slots runs: every slot with `fixed_batch`; the smallest
        bucket that holds them where the shape must be one of a few (CUDA graphs, torch.compile); exactly
        `rows` for an eager step, where every idle row would be computed for nothing (on a CPU that costs
        as much as a real row)."""
        if self.fixed_batch:
            return self.slots
        return bucket_for(rows, self.buckets) if self.fixed_span else min(rows, self.slots)

    def isolate_rows(self, *, fixed_batch: bool) -> None:
        """Prefill every row alone from now on, and with `fixed_batch` step all slots over the whole cache
        (see `row_arithmetic` for when each is needed)."""
        self.per_row_prefill = True
        self.fixed_batch = fixed_batch
        if fixed_batch:
            self.fixed_span, self.span = True, self.length

    @torch.inference_mode()
    def row_arithmetic(self, seed: int = 0) -> dict[str, bool | None]:
        """Whether this machine's kernels compute a decode-step row the same bits whoever shares the step.

        One random row (its token, position and cached keys and values) is stepped alone and among
        random other rows, and its float32 logits compared bit for bit:

        - `any_batch`: alone (a 1-row step, slot 0, the cache span it needs) against steps of 1, 2, 3,
          4, 8, 16… up to `slots` rows, the row in the highest one, over a longer span. Holds where a
          kernel sums each output the same way whatever the number of rows (measured: PyTorch's
          bfloat16 kernels on an AVX2 CPU); then prefilling each row alone is enough.
        - `fixed_batch` (tested only where `any_batch` fails, else None): all-slots steps over the whole
          cache, the row in slot 0 against the highest slot. Holds where a kernel's summation depends on
          the call's shape but not on a row's place in it (measured: MKL's float32 sgemm here); then
          steps of a fixed row count isolate rows.

        Kernels do not branch on values, so a random row tests the arithmetic itself. Leaves every slot
        reset (the cache holds noise, which idle rows may read: finite values).
        """
        text = self.text_config
        generator = torch.Generator().manual_seed(seed)

        def noise(*shape):
            return torch.randn(*shape, generator=generator).to(self.dtype).to(self.device)

        def randint(high, count):
            return torch.randint(0, high, (count,), generator=generator).to(self.device)

        caches = (*self.keys, *self.values)
        probe_caches = [noise(*cache.shape[1:]) for cache in caches]
        write = self.length // 2
        probe = {"token": int(randint(text.vocab_size, 1)), "position": write + 1, "write_index": write, "start": 0}

        def logits(slot: int, batch: int, span: int) -> torch.Tensor:
            for cache, mine in zip(caches, probe_caches):
                cache[slot] = mine
            for name, value in probe.items():
                getattr(self, name)[slot] = value
            self.span = span
            return self._forward(batch)[slot].clone()

        span = self.span
        try:
            for cache in caches:  # the other rows: random caches, tokens and positions
                cache.copy_(noise(*cache.shape))
            self.token.copy_(randint(text.vocab_size, self.slots))
            self.write_index.copy_(randint(write, self.slots))
            self.position.copy_(self.write_index + 1)
            self.start.zero_()
            fitted = min(self.length, -(-(write + 1) // 64) * 64)
            alone = logits(0, 1, fitted)
            sizes = sorted({b for b in (1, 2, 3, self.slots - 1, self.slots, *(2**i for i in range(10)))
                            if 1 <= b <= self.slots})
            longer = min(self.length, fitted + 64)
            any_batch = all(torch.equal(alone, logits(b - 1, b, longer)) for b in sizes)
            fixed_batch = None
            if not any_batch:
                first = logits(0, self.slots, self.length)
                fixed_batch = torch.equal(first, logits(self.slots - 1, self.slots, self.length))
        finally:
            self.span = span
            self.reset()
        return {"any_batch": any_batch, "fixed_batch": fixed_batch}

    def fit_span(self, positions: int) -> None:
        """Let eager steps attend over the first `positions` cache positions only (rounded up to 64; the
        rows' keys must all lie there). A no-op where the shape is fixed (graphs, torch.compile)."""
        if not self.fixed_span:
            self.span = min(self.length, -(-positions // 64) * 64)

    @torch.inference_mode()
    def run_step(self, batch: int, *, graphs: bool = True) -> None:
        """Replay the bucket's graph when there is one (and `graphs`), else run the step eagerly: the
        fixed-shape step (`fixed`), or with `graphs=False` rows stepped through PEFT's per-row adapter hooks
        (`peft`: the graphs hold the base model). Counted by path, on the host."""
        graph = self.graphs.get(batch) if graphs else None
        if graph is not None and self.graph_mode != invariant.enabled_kinds():
            graph = self._mode_changed()
        if graph is not None:
            graph.replay()
            path = "graph"
        elif graphs:
            self._step_fn(batch)
            path = "fixed"
        else:
            with self.peft_calls():  # the wrapped layers as they are: PEFT's hooks pick each row's adapter
                self._step(batch)
            path = "peft"
        self.steps[path] += 1
        if self.on_steps is not None:
            self.on_steps(path, 1)

    def _mode_changed(self) -> None:
        """The batch-invariant mode is not the one the graphs were captured under: step eagerly (the graphs
        would compute with the other mode's kernels) until they are captured again (`capture`)."""
        if not self._mode_warned:
            logger.warning("batch-invariant mode changed since the CUDA graphs were captured (%s, now %s): "
                           "steps run eagerly until the graphs are captured again",
                           sorted(self.graph_mode) or "off", sorted(invariant.enabled_kinds()) or "off")
            self._mode_warned = True
        return None

    @contextlib.contextmanager
    def without_graphs(self):
        """Every step inside runs the fixed-shape step eagerly (counted `fixed`): the reference a replay is
        compared with."""
        graphs, self.graphs = self.graphs, {}
        try:
            yield
        finally:
            self.graphs = graphs

    @property
    def eager_buckets(self) -> tuple[int, ...]:
        """Buckets whose steps run eagerly: all of them without graphs, else those whose capture failed."""
        return tuple(b for b in self.buckets if b not in self.graphs)

    # --- start-up: CUDA graphs ------------------------------------------------------------------

    @torch.inference_mode()
    def capture(self, context=contextlib.nullcontext) -> None:
        """Capture each bucket's step as a CUDA graph, largest first (its memory is then reserved for
        all of them: the graphs share one pool). `context()` wraps each capture. The graphs hold the stacked
        LoRA update too (it reads the rows' slots): base and adapter rows replay them. No-op unless
        `use_graphs` (CUDA).

        A bucket whose capture fails is logged once with its reason and keeps stepping eagerly (the same
        fixed-shape step, so the same answers); `capture_failures` says which and why. Called again (the
        batch-invariant mode changed), it captures every bucket anew; rows in the slots are reset.
        """
        if not self.use_graphs:
            return
        started = time.perf_counter()
        self.graphs, self.capture_failures, self.capture_report = {}, {}, {}
        self.graph_mode, self._mode_warned = invariant.enabled_kinds(), False
        for batch in sorted(self.buckets, reverse=True):
            tick, before = time.perf_counter(), self._reserved()
            try:
                self.graphs[batch] = self._capture_one(batch, context)
            except Exception as exc:  # this bucket steps eagerly; the others may still capture
                reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
                self.capture_failures[batch] = reason
                self._abandon_pool()
                logger.error("CUDA graph capture failed for bucket %d: %s; its steps run eagerly", batch, reason)
                continue
            self.capture_report[batch] = {"seconds": round(time.perf_counter() - tick, 4),
                                          "pool_mib": round((self._reserved() - before) / 2**20, 1)}
        self._synchronize()
        self.reset()
        self.capture_seconds = time.perf_counter() - started
        logger.info("captured %d decode graphs in %.1fs (buckets %s)%s", len(self.graphs), self.capture_seconds,
                    sorted(self.graphs), f"; eager: {sorted(self.capture_failures)}" if self.capture_failures else "")

    def _capture_one(self, batch: int, context):
        previous = torch.cuda.current_stream(self.device)
        try:
            with context():
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(previous)
                with torch.cuda.stream(stream):  # warm-up off the capture, as CUDA graphs require
                    for _ in range(2):
                        self._step(batch)
                previous.wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._graph_pool):
                    self._step(batch)
        finally:
            # When ending a capture raises, `torch.cuda.graph` never leaves its capture stream: this thread
            # would go on running everything there.
            torch.cuda.set_stream(previous)
        return graph

    def _abandon_pool(self) -> None:
        """After a failed capture: the graphs still to capture go to a fresh memory pool. When ending a
        capture raises (the capture was invalidated), PyTorch leaves its pool marked as being recorded
        to, and every later capture into it fails ("already recording to mempool_id", measured on an
        H200, torch 2.11); that mark is ended if PyTorch lets us, and the pool is left to the graphs
        captured into it before."""
        if self._graph_pool is not None:
            with contextlib.suppress(Exception):
                torch._C._cuda_endAllocateToPool(self.device.index or 0, self._graph_pool)
        self._graph_pool = None

    def _reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0

    @torch.inference_mode()
    def move(self, source: int, target: int) -> None:
        """Move a row from slot `source` to slot `target`: its keys and values, position, grammar state
        and outputs (the scheduler closes holes, so that steps run fewer rows)."""
        slotted = [*self.keys, *self.values, self.token, self.position, self.write_index, self.start,
                   self.finished, self.out_tokens, self.out_logprobs, self.adapter_slot, *vars(self.rows).values(),
                   *vars(self.state).values()]
        for tensor in slotted:
            tensor[target] = tensor[source]

    @torch.inference_mode()
    def reset(self, rows: slice | torch.Tensor | None = None) -> None:
        """Idle rows: finished, grammar done, writing at cache index 0 (harmless, finite)."""
        rows = slice(None) if rows is None else rows
        for tensor in (self.token, self.position, self.write_index, self.start, self.adapter_slot):
            tensor[rows] = 0
        self.finished[rows] = True
        self.state.state[rows] = DONE

    # --- prefill and the whole loop -------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, slots: list[int], inputs: dict[str, torch.Tensor], specs: list[RowSpec], *,
                share_images: bool = True, adapters: list[str] | None = None) -> None:
        """Run the prompts through the language model (prefill.py), put their keys in `slots`, pick each row's
        first token. `inputs`: the processor's left-padded `input_ids`, `attention_mask`, `token_type_ids`
        [n, P] and `pixel_values` [n, 3, S, S]; `specs[i]` is row i's grammar and budget; `adapters[i]` its
        PEFT adapter name (`__base__` for the base; None: no adapters attached). Inside PEFT's per-row hooks
        set `through_peft` (rows of adapters without a slot)."""
        input_ids = inputs["input_ids"]
        count, prompt_length = input_ids.shape
        longest = max(spec.budget for spec in specs) + 1
        if prompt_length + longest > self.length:
            raise ValueError(f"{prompt_length} prompt + {longest} new tokens exceed the cache ({self.length})")
        index = torch.tensor(slots, device=self.device)
        slot = None
        if self.lora is not None:
            slot = torch.tensor(self.lora.slots(adapters or ["__base__"] * count), device=self.device)
        features = self.image_features(inputs["pixel_values"], adapters, share=share_images)
        logits = self.prefiller.forward(index, inputs, features, slot)
        self._first_tokens(index, logits, specs, inputs["attention_mask"])
        if slot is not None:
            self.adapter_slot[index] = slot

    def image_features(self, pixel_values: torch.Tensor, adapters: list[str] | None, *, share: bool) -> torch.Tensor:
        """The projected vision features of a prefill's pictures: with adapter rows (and not already inside
        PEFT's hooks) through `vision_hooks`, PEFT's per-row hooks (adapters adapt the vision tower too)."""
        hooks = contextlib.nullcontext()
        if self.vision_hooks is not None and not self.through_peft:
            # Never the wrapped layers bare: PEFT would apply its active adapter to every row.
            hooks = self.vision_hooks(adapters or ["__base__"] * pixel_values.shape[0])
            share = False  # one picture reads differently under each adapter
        with hooks:
            return image_features(self.model, pixel_values, share=share).pooler_output

    def _first_tokens(self, index: torch.Tensor, logits: torch.Tensor, specs: list[RowSpec],
                      attention_mask: torch.Tensor) -> None:
        """Each prefilled row's grammar, first token (from `logits` [n, V]), position and cache span."""
        count, prompt_length = attention_mask.shape
        rows = compile_rows(specs, edges_per_row=self.edges_per_row, device=self.device)
        state = initial_state(count, self.device)
        finished = torch.zeros(count, dtype=torch.bool, device=self.device)
        out_tokens = torch.full((count, self.length), self.pad_id, dtype=torch.long, device=self.device)
        out_logprobs = torch.zeros((count, self.length), dtype=torch.float32, device=self.device)
        tokens = self._select(logits, rows, state, finished, out_tokens, out_logprobs)
        copy_rows(self.rows, rows, index)
        copy_rows(self.state, state, index)
        self.finished[index] = finished
        self.out_tokens[index] = out_tokens
        self.out_logprobs[index] = out_logprobs
        self.token[index] = tokens
        attended = attention_mask.sum(-1)
        self.position[index] = attended + 1  # generate's position of the next token (PaliGemma counts from 1)
        self.write_index[index] = prompt_length
        self.start[index] = prompt_length - attended

    @torch.inference_mode()
    def decode(self, inputs: dict[str, torch.Tensor], specs: list[RowSpec], *, share_images: bool = True,
               adapters: list[str] | None = None, context=None, graphs: bool = True,
               row_context=None) -> list[Decoded]:
        """Greedy generation of a whole batch (as `fastgen.greedy_decode`, the same tokens): prefill into
        slots 0..n-1 (each row alone with `per_row_prefill`, inside `row_context(i)`), then steps of
        `batch_for(n)` rows (a bucket, n for eager steps, or every slot) until every row is finished
        (checked every `sync_every` steps) or the longest budget is spent.

        `adapters`: each row's PEFT adapter name (None: no adapters attached); rows of stacked adapters run
        the same steps (and graphs) as base rows. `context(rows)` wraps the prefill (n rows) and the steps
        (bucket rows); with `graphs=False` they go through PEFT's per-row hooks (`context`) instead: rows of
        adapters that have no slot (`peft` steps).
        """
        count = inputs["input_ids"].shape[0]
        batch = self.batch_for(count)
        self.reset()
        steps = max(spec.budget for spec in specs) + 1  # the first one comes from the prefill
        self.fit_span(inputs["input_ids"].shape[1] + steps)
        context = context or (lambda rows: contextlib.nullcontext())
        started = time.perf_counter()
        with self.peft_calls(not graphs):
            if self.per_row_prefill and count > 1:
                # Row isolation: each row through the prefiller alone, at its own length, inside
                # `row_context(i)` (PEFT's per-row hooks, where they are used, need one name per row).
                row_context = row_context or (lambda row: context(1))
                for row in range(count):
                    with row_context(row):
                        self.prefill([row], one_row(inputs, row), [specs[row]], share_images=False,
                                     adapters=None if adapters is None else adapters[row:row + 1])
            else:
                with context(count):
                    self.prefill(list(range(count)), inputs, specs, share_images=share_images, adapters=adapters)
        self._synchronize()
        prefilled = time.perf_counter()
        with context(batch):
            done = 1
            while done < steps and not bool(self.finished[:count].all()):
                for _ in range(min(self.sync_every, steps - done)):
                    self.run_step(batch, graphs=graphs)
                done += min(self.sync_every, steps - done)
        self._synchronize()
        finished = time.perf_counter()
        # What the last call cost (benchmarks read it: a replayed graph calls no module hooks).
        self.last_timing = {"prefill_s": prefilled - started, "steps": done - 1, "bucket": batch,
                            "step_ms": (finished - prefilled) * 1000 / max(done - 1, 1)}
        return self.results(list(range(count)))

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def results(self, slots: list[int]) -> list[Decoded]:
        """The slots' emitted tokens (up to their end token) and log-probabilities, read in one copy."""
        index = torch.tensor(slots, device=self.device)
        tokens, logprobs, written = self.out_tokens[index].cpu(), self.out_logprobs[index].cpu(), \
            self.state.generated[index].cpu()
        decoded = []
        for row_tokens, row_logprobs, count in zip(tokens.tolist(), logprobs.tolist(), written.tolist()):
            row_tokens = row_tokens[:count]
            end = row_tokens.index(self.eos_id) if self.eos_id in row_tokens else len(row_tokens)
            decoded.append(Decoded(row_tokens[:end], row_logprobs[:end]))
        return decoded
