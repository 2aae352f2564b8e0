"""The graph engine's prefill: the prompts through the language model with our own attention kernel, each
layer's keys and values written straight into the decoder's static cache.

transformers runs Gemma 2's prefill through its eager attention (soft-capping rules out SDPA): scores
[B, H, P, P] materialised and swept by scale, tanh, mask and softmax one pass at a time, masks built per call
from mask functions, and every key copied from a growing cache into the static one afterwards. Here:

- **the kernel**, chosen once when the decoder is built (`choose_attention`, shown in /models):
  `flex` is `torch.nn.attention.flex_attention`, compiled, with a score modifier for the soft-capping
  (`tanh(s / cap) * cap`, the eager order) and a block mask for PaliGemma's prefix (below); `eager` is the
  engine's grouped eager attention (`fastgen.grouped_attention`: Gemma 2's arithmetic without `repeat_kv`)
  over the same mask materialised. `auto` takes `flex` on CUDA and `eager` on CPUs, where compiled flex
  attention measured slower than the eager kernel (docs/benchmarks.md); where the kernel does not compile
  (no Triton, no C++ compiler) the engine stays on `eager` and says why.
- **the mask**, as transformers builds it for PaliGemma 2: a key is seen if it is not left padding and
  either both query and key lie in the prefix (image + prompt: bidirectional; token type 0) or the key is
  not after the query (causal, and for sliding layers within the window). Every prompt is wholly prefix,
  so a prefill attends bidirectionally over each row's whole prompt; one prefix is never split (that would
  change the answers).
- **shape buckets** (flex): the kernel compiles once per (batch bucket, length bucket): rows padded to the
  decoder's next bucket, lengths to the next multiple of `LENGTH_BUCKET` (extra keys on the left, masked).
  Each bucket's block mask is built once; its mask function reads the rows' first valid index and prefix
  end from small tensors refilled per call, so every block is evaluated (no block skipping to get wrong).
- **the last layer** computes keys and values for every position (the cache needs them) but queries,
  attention, output projection and MLP for the last position only: the first token needs nothing else.
  (transformers computes the whole layer and keeps one row.)
- **LoRA rows**: the linear layers go through the decoder's stacked adapters (lora.py), as in the step.

The vision tower runs as the model was loaded: SDPA (SigLIP has no soft-capping), or PEFT's per-row hooks
around it when adapters are attached (they adapt the vision tower too).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch
from transformers.models.gemma2.modeling_gemma2 import rotate_half

from ..fastgen import grouped_attention

logger = logging.getLogger(__name__)

PREFILL_ATTENTIONS = ("auto", "flex", "eager")
LENGTH_BUCKET = 32  # flex: prompt lengths are rounded up to a multiple of this (one compile per bucket)
NO_WINDOW = 2**30  # the window of full-attention layers


@dataclass(frozen=True)
class AttentionChoice:
    """The prefill's attention kernel (`flex` or `eager`) and why it was chosen."""

    kernel: str
    why: str


@functools.lru_cache(maxsize=4)
def flex_problem(device_type: str) -> str | None:
    """Why compiled flex_attention cannot run on this kind of device (None: it runs): a tiny call with a
    score modifier and a mask function is compiled and compared with plain arithmetic."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    try:
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 32, 16, generator=generator).to(device_type) for _ in range(3))
        start = torch.tensor([3], device=device_type)

        def mask(b, h, q_idx, kv_idx):
            return kv_idx >= start[b]

        block_mask = create_block_mask(mask, 1, None, 32, 32, device=device_type)
        got = torch.compile(flex_attention, dynamic=False)(q, k, v, score_mod=_softcap(20.0), block_mask=block_mask)
        scores = torch.tanh(q @ k.transpose(-1, -2) * 16**-0.5 / 20.0) * 20.0
        scores[..., :3] = float("-inf")
        want = torch.softmax(scores, -1) @ v
        if not torch.allclose(got, want, atol=1e-3):
            return f"a test call differs from plain arithmetic by {float((got - want).abs().max()):.2g}"
    except Exception as exc:  # noqa: BLE001 -- whatever stops it, the eager kernel serves
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    return None


def choose_attention(requested: str, device: torch.device) -> AttentionChoice:
    """The prefill kernel for `requested` (`auto`, `flex`, `eager`; SEG_PREFILL_ATTENTION) on `device`."""
    if requested not in PREFILL_ATTENTIONS:
        raise ValueError(f"prefill attention must be one of {', '.join(PREFILL_ATTENTIONS)}, not {requested!r}")
    if requested == "eager":
        return AttentionChoice("eager", "asked for (eager)")
    if requested == "auto" and device.type != "cuda":
        return AttentionChoice("eager", f"auto on {device.type}: compiled flex_attention measured slower than the "
                                        "eager kernel on CPUs (docs/benchmarks.md)")
    problem = flex_problem(device.type)
    if problem is not None:
        logger.warning("prefill: flex_attention is unavailable on %s (%s): the eager kernel serves", device, problem)
        return AttentionChoice("eager", f"flex_attention unavailable on {device.type}: {problem}")
    return AttentionChoice("flex", f"{requested}: compiled flex_attention, one kernel per shape bucket")


def _softcap(cap: float):
    def softcap(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    return softcap


def allowed(q_idx, kv_idx, start, prefix_end, window):
    """Whether a query sees a key, as transformers masks PaliGemma 2 (padding, prefix, causal, window)."""
    prefix = (q_idx < prefix_end) & (kv_idx < prefix_end)
    causal = (kv_idx <= q_idx) & (kv_idx > q_idx - window)
    return (kv_idx >= start) & (prefix | causal)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, heads, n, D] (transformers' `apply_rotary_pos_emb`, one tensor)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


class _Bucket:
    """One flex shape bucket: its rows' mask facts (refilled per call) and its block mask, built once."""

    def __init__(self, rows: int, length: int, device: torch.device):
        from torch.nn.attention import flex_attention as flex

        self.rows, self.length = rows, length
        self.start = torch.zeros(rows, dtype=torch.long, device=device)
        self.prefix_end = torch.full((rows,), length, dtype=torch.long, device=device)
        self.window = torch.tensor(NO_WINDOW, dtype=torch.long, device=device)
        start, prefix_end, window = self.start, self.prefix_end, self.window

        def mask(b, h, q_idx, kv_idx):
            return allowed(q_idx, kv_idx, start[b], prefix_end[b], window)

        # Every block partial: the mask function decides each position from the current contents.
        size = getattr(flex, "_DEFAULT_SPARSE_BLOCK_SIZE", 128)
        blocks = -(-length // size)
        counts = torch.full((rows, 1, blocks), blocks, dtype=torch.int32, device=device)
        indices = torch.arange(blocks, dtype=torch.int32, device=device).expand(rows, 1, blocks, blocks).contiguous()
        self.block_mask = flex.BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=size, mask_mod=mask,
                                                   seq_lengths=(length, length))


class Prefill:
    """The prefill forward of a `StaticDecoder` (see the module docstring)."""

    def __init__(self, decoder, choice: AttentionChoice, *, compile_backend="inductor"):
        self.decoder = decoder
        self.choice = choice
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.compile_seconds: dict[str, float] = {}  # "rows x length" -> seconds of its first call
        self._compiled: set[tuple[int, int]] = set()
        self._score_mods: dict[float, object] = {}  # one function per cap: a new one would compile anew
        self._flex = None
        if choice.kernel == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            # One compiled kernel per bucket: let dynamo keep them all (its default keeps 8 per function).
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._flex = torch.compile(flex_attention, dynamic=False, backend=compile_backend)

    @property
    def kernel(self) -> str:
        return self.choice.kernel

    def describe(self) -> dict:
        vision = self.decoder.model.config.vision_config._attn_implementation
        return {"attention": self.kernel, "why": self.choice.why, "vision_attention": vision,
                "buckets": sorted(f"{r}x{n}" for r, n in self.buckets)}

    def bucket_for(self, rows: int, length: int) -> tuple[int, int]:
        """The flex shape bucket of `rows` prompts of `length` tokens."""
        from .decoder import bucket_for

        batch = bucket_for(rows, self.decoder.buckets) if rows <= self.decoder.slots else rows
        return batch, -(-length // LENGTH_BUCKET) * LENGTH_BUCKET

    @torch.inference_mode()
    def forward(self, index: torch.Tensor, inputs: dict[str, torch.Tensor], features: torch.Tensor,
                slot: torch.Tensor | None) -> torch.Tensor:
        """Float32 logits [n, V] of each prompt's last position; every layer's keys and values of the n rows
        go into the decoder's cache rows `index` at positions 0..P-1.

        `inputs`: the processor's left-padded `input_ids`, `attention_mask`, `token_type_ids` [n, P];
        `features`: the projected image features [n, image tokens, hidden]; `slot`: each row's LoRA slot.
        """
        decoder = self.decoder
        model, lm = decoder.model, decoder.model.model.language_model
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        rows, length = input_ids.shape
        image_token = model.config.image_token_id
        ids = input_ids.masked_fill(input_ids == image_token, 0) if image_token >= lm.vocab_size else input_ids
        hidden = lm.embed_tokens(ids)
        image_positions = (input_ids == image_token).unsqueeze(-1).expand_as(hidden)
        hidden = hidden.masked_scatter(image_positions, features.to(hidden.device, hidden.dtype))
        # generate's positions: count of attended tokens so far (padding gets 1), plus PaliGemma's 1.
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 1) + 1
        cos, sin = lm.rotary_emb(hidden, positions)
        start = length - attention_mask.sum(-1)  # left padding: the first valid position
        kinds = inputs.get("token_type_ids")  # 0: prefix (image + prompt), 1: suffix (only at the end)
        prefix_end = length - (kinds * attention_mask).sum(-1) if kinds is not None else start.new_full((rows,), length)
        masks = self._masks(start, prefix_end, rows, length)
        layers = lm.layers[: decoder.text_config.num_hidden_layers]
        for number, layer in enumerate(layers):
            last = number == len(layers) - 1
            hidden = self._layer(number, layer, hidden, cos, sin, masks, index, slot, last=last,
                                 last_mask=self._last_row_mask(start, prefix_end, length, number) if last else None)
        logits = decoder.linear(model.lm_head, lm.norm(hidden[:, -1:]), slot)[:, -1]
        if decoder.final_softcap is not None:
            logits = torch.tanh(logits / decoder.final_softcap) * decoder.final_softcap
        return logits.float()

    def _layer(self, number: int, layer, hidden, cos, sin, masks, index, slot, *, last: bool, last_mask=None):
        decoder = self.decoder
        attention = layer.self_attn
        rows, length, _ = hidden.shape
        x = layer.input_layernorm(hidden)
        key = decoder.linear(attention.k_proj, x, slot).view(rows, length, -1, attention.head_dim).transpose(1, 2)
        value = decoder.linear(attention.v_proj, x, slot).view(rows, length, -1, attention.head_dim).transpose(1, 2)
        key = _rotate(key, cos, sin)
        decoder.keys[number][index, :, :length] = key
        decoder.values[number][index, :, :length] = value
        if last:  # only the last position goes on: the first token needs nothing else
            x, hidden, cos, sin = x[:, -1:], hidden[:, -1:], cos[:, -1:], sin[:, -1:]
        queries = x.shape[1]
        query = decoder.linear(attention.q_proj, x, slot).view(rows, queries, -1, attention.head_dim).transpose(1, 2)
        query = _rotate(query, cos, sin)
        sliding = decoder.sliding[number]
        if last:
            out, _ = grouped_attention(attention, query, key, value, last_mask, scaling=attention.scaling,
                                       softcap=attention.attn_logit_softcapping)
        else:
            out = self._attend(attention, query, key, value, masks, sliding)
        out = decoder.linear(attention.o_proj, out.reshape(rows, queries, -1), slot)
        hidden = hidden + layer.post_attention_layernorm(out)
        out = decoder.mlp(layer.mlp, layer.pre_feedforward_layernorm(hidden), slot)
        return hidden + layer.post_feedforward_layernorm(out)


    # --- masks and kernels ------------------------------------------------------------------------

    def _window(self, sliding: bool) -> int:
        window = self.decoder.window
        return window if sliding and window is not None else NO_WINDOW

    def _masks(self, start, prefix_end, rows: int, length: int):
        """The eager kernel's additive masks {sliding?: [n, 1, P, P]}, or the flex bucket with its facts."""
        if self.kernel == "flex":
            return self._fill_bucket(start, prefix_end, rows, length)
        positions = torch.arange(length, device=start.device)
        q_idx, kv_idx = positions[None, :, None], positions[None, None, :]
        lowest = torch.finfo(self.decoder.dtype).min
        masks = {}
        for sliding in sorted(set(self.decoder.sliding)):
            seen = allowed(q_idx, kv_idx, start[:, None, None], prefix_end[:, None, None], self._window(sliding))
            masks[sliding] = torch.where(seen, 0.0, lowest).to(self.decoder.dtype)[:, None]
        return masks

    def _last_row_mask(self, start, prefix_end, length: int, number: int) -> torch.Tensor:
        """The additive mask [n, 1, 1, P] of the last position's query (the last layer's one query)."""
        kv_idx = torch.arange(length, device=start.device)[None, None, :]
        q_idx = torch.full_like(kv_idx[..., :1], length - 1)
        seen = allowed(q_idx, kv_idx, start[:, None, None], prefix_end[:, None, None],
                       self._window(self.decoder.sliding[number]))
        return torch.where(seen, 0.0, torch.finfo(self.decoder.dtype).min).to(self.decoder.dtype)[:, None]

    def _fill_bucket(self, start, prefix_end, rows: int, length: int) -> _Bucket:
        key = self.bucket_for(rows, length)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = _Bucket(*key, self.decoder.device)
        shift = bucket.length - length  # the prompts move right by the extra padding
        bucket.start[:rows] = start + shift
        bucket.prefix_end[:rows] = prefix_end + shift
        bucket.start[rows:] = 0  # idle rows (zeros) see everything: no row without keys
        bucket.prefix_end[rows:] = bucket.length
        return bucket

    def _attend(self, attention, query, key, value, masks, sliding: bool) -> torch.Tensor:
        """Attention output [n, P, H, D] of every position."""
        if self.kernel == "eager":
            out, _ = grouped_attention(attention, query, key, value, masks[sliding], scaling=attention.scaling,
                                       softcap=attention.attn_logit_softcapping)
            return out
        bucket: _Bucket = masks
        rows, heads, length, dim = query.shape
        bucket.window.fill_(self._window(sliding))
        padded = [self._pad(t, bucket) for t in (query, key, value)]
        cap = attention.attn_logit_softcapping
        if cap is not None and cap not in self._score_mods:
            self._score_mods[cap] = _softcap(cap)
        first = (bucket.rows, bucket.length) not in self._compiled
        started = time.perf_counter()
        out = self._flex(*padded, score_mod=self._score_mods.get(cap), block_mask=bucket.block_mask,
                         scale=attention.scaling, enable_gqa=heads != key.shape[1])
        if first:
            self._compiled.add((bucket.rows, bucket.length))
            self.compile_seconds[f"{bucket.rows}x{bucket.length}"] = round(time.perf_counter() - started, 3)
            logger.info("prefill: flex_attention compiled for %d rows x %d positions in %.1fs", bucket.rows,
                        bucket.length, time.perf_counter() - started)
        return out[:rows, :, bucket.length - length:].transpose(1, 2).contiguous()

    @staticmethod
    def _pad(tensor: torch.Tensor, bucket: _Bucket) -> torch.Tensor:
        """[n, h, P, D] -> [rows, h, length, D]: zeros above (idle rows) and to the left (extra padding)."""
        rows, heads, length, dim = tensor.shape
        if rows == bucket.rows and length == bucket.length:
            return tensor
        padded = tensor.new_zeros(bucket.rows, heads, bucket.length, dim)
        padded[:rows, :, bucket.length - length:] = tensor
        return padded
