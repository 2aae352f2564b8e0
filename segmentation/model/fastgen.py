"""Our own greedy decode loop for PaliGemma 2: the same tokens as `model.generate`, less work per step.

`model.generate` spends most of a decode step on the CPU in eager PyTorch overhead rather than
arithmetic (docs/benchmarks.md). This loop calls the same model forward with the same inputs
(left-padded prompts, `token_type_ids`, 1-based positions counted over the attention mask), picks
tokens the same way (argmax of float32 logits after the grammar; finished rows get the pad token)
and removes three costs:

- **KV cache growth.** `DynamicCache` concatenates every layer's keys and values each step (a copy of
  the whole cache). `GrowingLayer` writes into a buffer allocated once for the whole generation and
  hands out views of its filled part.
- **Key/value head repetition.** Gemma 2's eager attention (which it needs for its logit soft-capping)
  copies every cached key and value once per query head group each step (`repeat_kv`).
  `grouped_attention` multiplies each key/value head with its group of query heads directly: the same
  products, no copies. It is registered with transformers' attention interface as `grouped_eager`.
- **Repeated images.** Several prompts on one image (a batch of one picture with many questions) run
  the vision tower once per distinct picture (`image_features`).

Every row's forward extras (e.g. per-row adapter names) go in `forward_kwargs`, passed to every call.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling

GROUPED_ATTENTION = "grouped_eager"


def grouped_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Gemma 2's eager attention (scale, tanh soft-cap, additive mask, float32 softmax) without `repeat_kv`.

    query [B, H, Q, D]; key, value [B, Hkv, K, D] with H = Hkv * G (query head h reads key head
    h // G, as `repeat_kv` lays them out); attention_mask additive [B, 1, Q, K] or None.
    Returns ([B, Q, H, D] contiguous, None): what the eager function returns, without the weights.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    # [B, Hkv, G*Q, D]: each key/value head meets all of its query heads in one matmul.
    grouped = query.reshape(batch, kv_heads, groups * q_len, dim)
    weights = torch.matmul(grouped, key.transpose(2, 3)) * scaling
    if softcap is not None:
        weights = weights.div_(softcap).tanh_().mul_(softcap)
    if attention_mask is not None:
        weights = (weights.view(batch, kv_heads, groups, q_len, -1) + attention_mask[:, :, None]).view(
            batch, kv_heads, groups * q_len, -1
        )
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value)  # [B, Hkv, G*Q, D]
    return output.view(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_ATTENTION, eager_mask)


class GrowingLayer(DynamicLayer):
    """A cache layer whose keys and values live in a buffer sized once for the whole generation.

    `keys`/`values` are views [B, Hkv, filled, D] of that buffer, so the rest of transformers sees a
    `DynamicLayer`; `update` writes the new states in place instead of concatenating.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.filled = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.device = key_states.device
        self._key_buffer = key_states.new_empty(batch, heads, self.capacity, dim)
        self._value_buffer = value_states.new_empty(batch, value_states.shape[1], self.capacity, value_states.shape[3])
        self.keys, self.values = self._key_buffer[:, :, :0], self._value_buffer[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.filled + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"cache holds {self.capacity} positions, {end} needed")
        self._key_buffer[:, :, self.filled:end] = key_states
        self._value_buffer[:, :, self.filled:end] = value_states
        self.filled = end
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.filled


def make_cache(config, capacity: int) -> Cache:
    """A `GrowingLayer` cache when every position fits in Gemma 2's sliding window (then sliding and
    full layers see the same keys), else transformers' own `DynamicCache`."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if window is not None and capacity > window:
        return DynamicCache(config=text)
    return Cache(layers=[GrowingLayer(capacity) for _ in range(text.num_hidden_layers)])


@contextlib.contextmanager
def grouped_attention_in(model):
    """Inside the block, the text model runs `grouped_attention` where it would run eager attention.

    Gemma 2 layers read their config's `_attn_implementation` at every call, so this only changes what
    runs inside the block (the same model object also serves `model.generate`).
    """
    text = model.config.get_text_config()
    previous = text._attn_implementation
    if previous == "eager":
        text._attn_implementation = GROUPED_ATTENTION
    try:
        yield
    finally:
        text._attn_implementation = previous


def image_features(model, pixel_values: torch.Tensor, *, share: bool = True) -> BaseModelOutputWithPooling:
    """The projected vision features [B, tokens, hidden] of each picture, each distinct picture encoded once.

    pixel_values [B, 3, S, S]. Pictures are matched by their exact bytes.
    """
    if not share or pixel_values.shape[0] == 1:
        return model.model.get_image_features(pixel_values)
    digests = [hashlib.blake2b(p.cpu().contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).digest()
               for p in pixel_values]  # bytes of any dtype (numpy has no bfloat16)
    first: dict[bytes, int] = {}
    inverse = [first.setdefault(d, len(first)) for d in digests]
    if len(first) == len(digests):
        return model.model.get_image_features(pixel_values)
    unique = [digests.index(d) for d in first]
    features = model.model.get_image_features(pixel_values[unique]).pooler_output
    return BaseModelOutputWithPooling(pooler_output=features[torch.tensor(inverse, device=features.device)])


@torch.inference_mode()
def greedy_decode(
    model,
    inputs: dict[str, torch.Tensor],
    logits_processor,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    share_images: bool = True,
    forward_kwargs: dict | None = None,
) -> torch.Tensor:
    """Greedy generation as `model.generate(do_sample=False, num_beams=1)` does it; returns the new
    ids [B, <= max_new_tokens] (rows that ended early are filled with `pad_id` after their end token).

    `inputs`: the processor's `input_ids`, `attention_mask`, `token_type_ids` [B, L] (left padded) and
    `pixel_values` [B, 3, S, S]. `logits_processor(ids [B, L + t], scores [B, V]) -> scores`, as in
    `generate`. `forward_kwargs`: extra keyword arguments for every forward call (per-row adapters).
    """
    extra = forward_kwargs or {}
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    batch, prompt_length = input_ids.shape
    total = prompt_length + max_new_tokens
    device = input_ids.device
    # Ids and mask for the whole generation, allocated once; each step reads views of them.
    ids = torch.full((batch, total), pad_id, dtype=input_ids.dtype, device=device)
    ids[:, :prompt_length] = input_ids
    mask = torch.ones((batch, total), dtype=attention_mask.dtype, device=device)
    mask[:, :prompt_length] = attention_mask
    # generate's positions: count of attended tokens so far (padding gets 1), plus PaliGemma's 1.
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 1) + 1
    cache = make_cache(model.config, total)
    features = image_features(model, inputs["pixel_values"], share=share_images)
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, token_type_ids=inputs["token_type_ids"],
        position_ids=positions, mm_encoder_outputs={"image": features}, cache=cache, use_cache=True,
        logits_to_keep=1, **extra,
    )
    unfinished = torch.ones(batch, dtype=torch.long, device=device)
    position = positions[:, -1:]
    suffix_type = torch.ones((batch, 1), dtype=inputs["token_type_ids"].dtype, device=device)
    length = prompt_length
    while True:
        scores = outputs.logits[:, -1].to(dtype=torch.float32)
        scores = logits_processor(ids[:, :length], scores)
        tokens = torch.argmax(scores, dim=-1)
        tokens = tokens * unfinished + pad_id * (1 - unfinished)
        ids[:, length] = tokens
        length += 1
        unfinished = unfinished & (tokens != eos_id).long()
        if length == total or not bool(unfinished.any()):
            break
        position = position + 1
        outputs = model(
            input_ids=ids[:, length - 1:length], attention_mask=mask[:, :length], token_type_ids=suffix_type,
            position_ids=position, cache=cache, use_cache=True, logits_to_keep=1, **extra,
        )
    return ids[:, prompt_length:length]
