"""LoRA rows in the graph engine's step, measured (scripts/gpu_check.py's `lora` phase): random adapters written
from a loaded model's shapes, and the decode step's milliseconds for base-only and mixed base/adapter rows.

- `write_random_lora` saves a PEFT LoRA adapter directory for a model already in memory (no second copy of
  the weights is loaded, unlike tests/lora.py's `write_random_adapter`): random A and B of rank `rank` on
  every linear layer whose name ends in one of `targets`, in both towers.
- `time_steps` prefills rows with the given adapters into slots 0..n-1 and times `steps` decode steps of
  their bucket as the scheduler runs them (CUDA graph replays on a GPU, the fixed-shape step on a CPU),
  synchronising only at both ends; finished rows keep stepping, so every step does the same work.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_lora(model, out: Path, *, rank: int, seed: int, targets=TARGETS, scale: float = 0.5) -> Path:
    """A LoRA adapter of `model` (a PaliGemmaForConditionalGeneration) in `out`: adapter_config.json and
    adapter_model.safetensors, B random too (so that answers change), in bfloat16."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            a = torch.randn(rank, module.in_features, generator=generator) * (scale / module.in_features**0.5)
            b = torch.randn(module.out_features, rank, generator=generator) * (scale / rank**0.5)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)).save_pretrained(str(out))
    json.loads((out / "adapter_config.json").read_text())  # written whole
    return out


@torch.inference_mode()
def time_steps(engine, adapters: list[str | None], *, steps: int = 40, seed: int = 0) -> dict:
    """Milliseconds per decode step of `len(adapters)` rows (each row's adapter id or None), on `engine`'s
    graph decoder; with the steps' paths (graph, fixed, peft) and the bucket."""
    from engine_timing import sample_batch

    count = len(adapters)
    images, prompts = sample_batch(count, seed=seed)
    inputs = engine.prepare(images, prompts)
    specs = [engine.row_spec(p, min(engine.max_new_tokens, steps + 8)) for p in prompts]
    names = engine.forward_kwargs(prompts, adapters).get("adapter_names")
    decoder = engine.decoder
    context, graphs = engine.graph_context(names)
    decoder.reset()
    decoder.fit_span(inputs["input_ids"].shape[1] + steps + 1)
    with context(count), decoder.peft_calls(not graphs):
        decoder.prefill(list(range(count)), inputs, specs, share_images=False, adapters=names)
    bucket = decoder.batch_for(count)
    with context(bucket):
        decoder.run_step(bucket, graphs=graphs)  # warm: the first replay after a prefill
        synchronize(decoder.device)
        before = dict(decoder.steps)
        start = time.perf_counter()
        for _ in range(steps):
            decoder.run_step(bucket, graphs=graphs)
        synchronize(decoder.device)
    seconds = time.perf_counter() - start
    paths = {p: n - before[p] for p, n in decoder.steps.items() if n != before[p]}
    return {"rows": count, "bucket": bucket, "adapter_rows": sum(a is not None for a in adapters),
            "step_ms": round(seconds * 1000 / steps, 3), "paths": paths}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
