"""Random LoRA adapters for the tiny fixture: non-zero weights, so answers change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from servers import DEMO_MODEL, ROOT

# The adapters the shared adapter server serves (tests/conftest.py): two random ones, one fine-tuned.
ADAPTERS = {"acme/lora-a": "a", "acme/lora-b": "b"}
FINETUNED = "acme/finetuned"
SERVED_ADAPTERS = [*ADAPTERS, FINETUNED]

# The tiny model's attention and MLP projections (text and vision towers).
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_random_adapter(base_dir: Path, out: Path, seed: int, scale: float = 1.0,
                         target_modules: list[str] | None = None, rank: int = 4) -> Path:
    """Save a LoRA adapter of the PaliGemma in `base_dir` with random A and B matrices (rank `rank`) to `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration.from_pretrained(base_dir, local_files_only=True)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target_modules or TARGET_MODULES,
                        init_lora_weights=False)  # False: B is random too, so the adapter changes outputs
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(scale)
    peft_model.save_pretrained(out)
    return out


def run_import(home: Path, *args) -> subprocess.CompletedProcess:
    """scripts/import_models.py with `args` into the BentoML home `home`."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "import_models.py"), *map(str, args)],
                          env={**os.environ, "BENTOML_HOME": str(home)}, capture_output=True, text=True, timeout=300)


def import_adapter(home: Path, directory: Path, adapter_id: str, base: str = DEMO_MODEL) -> None:
    result = run_import(home, "--adapter", directory, "--base", base, "--as", adapter_id)
    assert result.returncode == 0, result.stdout + result.stderr
