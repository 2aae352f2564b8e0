"""Where a generation's time goes: prefill and per-token step times of engine settings, beside the floor
of a bare loop of forward calls on the same model (used by scripts/benchmark.py and scripts/bench_gpu.py).

- An engine's **prefill** is the time from `generate` being called to the start of its second forward
  call (input processing, vision tower, the prompt's forward, the first token's grammar and choice);
  its **step** is the median time between the starts of two later forward calls (one token: forward,
  grammar, choice, bookkeeping). Budgets are forced (`max_new_tokens`), the grammar runs as configured.
- The `graph` engine's figures come from the decoder's own clock (`StaticDecoder.last_timing`): its
  step is the mean over the generation, CUDA graph replays included (they call no module hooks).
- The **bare loop** is the least any engine could do with the model as it is: one prefill forward, then
  forward calls on a `DynamicCache` with an argmax between them, no grammar, no scores, eager attention.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from PIL import Image

PROMPTS = ("cat", "cat ; dog", "person", "car ; bus ; truck", "the man on the left", "bird")


def sample_batch(batch: int, seed: int = 0) -> tuple[list[Image.Image], list]:
    """`batch` distinct random pictures (224 px) and mixed segment prompts."""
    from segmentation.model.prompts import parse_prompt

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(batch)]
    return images, [parse_prompt(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_engine(engine, images: list[Image.Image], prompts: list, tokens: int) -> dict:
    """Prefill seconds, median step ms and tokens of one `engine.generate` call (see the module docstring)."""
    starts: list[float] = []

    def stamp(module, args, kwargs):
        _sync(engine.device)
        starts.append(time.perf_counter())

    handle = engine.model.register_forward_pre_hook(stamp, with_kwargs=True)
    try:
        begin = time.perf_counter()
        generations = engine.generate(images, prompts, max_new_tokens=[tokens] * len(images))
        _sync(engine.device)
        total = time.perf_counter() - begin
    finally:
        handle.remove()
    steps = np.diff(starts[1:])
    if getattr(engine, "generation", None) == "graph" and engine.decoder.last_timing:
        # Replayed CUDA graphs call no forward hooks: the decoder times its own prefill and steps.
        timing = engine.decoder.last_timing
        starts = [begin, begin + timing["prefill_s"]] + [0.0] * timing["steps"]
        steps = [timing["step_ms"] / 1000]
    return {
        "prefill_s": (starts[1] if len(starts) > 1 else begin + total) - begin,
        "step_ms": float(np.median(steps)) * 1000 if len(steps) else None,
        "total_s": total,
        "tokens": sum(len(g.token_ids) for g in generations),
        "forward_calls": len(starts),
        "generations": generations,
    }


def processor_inputs(engine, images: list[Image.Image], prompts: list) -> dict:
    """The tensors `engine.generate` hands the model for this batch."""
    from segmentation.model.images import model_input

    pictures = [model_input(image, engine.image_size) for image in images]
    inputs = engine.processor(images=pictures, text=["<image>" + p.text for p in prompts], return_tensors="pt",
                              padding="longest")
    inputs.pop("labels", None)
    inputs = inputs.to(engine.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(engine.model.dtype)
    return dict(inputs)


@torch.inference_mode()
def time_bare_loop(engine, images: list[Image.Image], prompts: list, tokens: int) -> dict:
    """Prefill seconds and median step ms of plain forward calls with a `DynamicCache` (the floor)."""
    from transformers import DynamicCache

    model = engine.model
    inputs = processor_inputs(engine, images, prompts)
    mask = inputs["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 1) + 1
    cache = DynamicCache(config=model.config.get_text_config())
    begin = time.perf_counter()
    outputs = model(**inputs, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
    token = outputs.logits[:, -1].argmax(-1, keepdim=True)
    _sync(engine.device)
    prefill = time.perf_counter() - begin
    ones = torch.ones_like(token)
    position = positions[:, -1:]
    steps = []
    for _ in range(tokens - 1):
        start = time.perf_counter()
        mask = torch.cat([mask, ones], dim=1)
        position = position + 1
        outputs = model(input_ids=token, attention_mask=mask, position_ids=position, token_type_ids=ones,
                        cache=cache, use_cache=True, logits_to_keep=1)
        token = outputs.logits[:, -1].argmax(-1, keepdim=True)
        _sync(engine.device)
        steps.append(time.perf_counter() - start)
    return {"prefill_s": prefill, "step_ms": statistics.median(steps) * 1000 if steps else None}


def compare(engines: dict, batches: list[int], tokens: int, rounds: int = 2, bare: str | None = None,
            log=print) -> list[dict]:
    """Each engine setting (and the bare loop on the model of `engines[bare]`) at each batch size,
    interleaved over `rounds`; one row per (setting, batch) with medians and every round's figure."""
    samples: dict[tuple[str, int], list[dict]] = {}
    for batch in batches:
        images, prompts = sample_batch(batch)
        for engine in engines.values():  # warm-up: first calls allocate and load kernels
            engine.generate(images[:1], prompts[:1], max_new_tokens=[4])
        for round_index in range(rounds):
            names = list(engines) if round_index % 2 == 0 else list(reversed(engines))
            for name in names:
                figures = time_engine(engines[name], images, prompts, tokens)
                samples.setdefault((name, batch), []).append(figures)
                log(f"[engine {name} b={batch} round {round_index + 1}] prefill {figures['prefill_s']:.3f}s "
                    f"step {figures['step_ms']}ms tokens {figures['tokens']}")
            if bare is not None:
                figures = time_bare_loop(engines[bare], images, prompts, tokens)
                samples.setdefault((f"bare loop ({bare} model)", batch), []).append(figures)
                log(f"[bare loop b={batch} round {round_index + 1}] prefill {figures['prefill_s']:.3f}s "
                    f"step {figures['step_ms']:.2f}ms")
    rows = []
    for (name, batch), runs in samples.items():
        rows.append({
            "setting": name, "batch": batch, "tokens_per_row": tokens,
            "prefill_s": round(statistics.median(r["prefill_s"] for r in runs), 4),
            "step_ms": _median([r["step_ms"] for r in runs]),
            "prefill_s_rounds": [round(r["prefill_s"], 4) for r in runs],
            "step_ms_rounds": [None if r["step_ms"] is None else round(r["step_ms"], 3) for r in runs],
            **({"tokens": runs[-1]["tokens"]} if "tokens" in runs[-1] else {}),
        })
    return rows


def _median(values: list[float | None]) -> float | None:
    """Median of the values that exist (a row that ended at once has no step time)."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def cpu_has_native_bfloat16() -> bool:
    """AVX-512 BF16 or AMX on this CPU (Linux `/proc/cpuinfo` flags)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))
