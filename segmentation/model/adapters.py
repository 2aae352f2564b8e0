"""PEFT LoRA adapters of a PaliGemma model: checked before anything loads them, attached unmerged.

An adapter directory is what PEFT's `save_pretrained` writes: `adapter_config.json` (peft_type
`LORA`, the target modules) and `adapter_model.safetensors`. Several adapters of one base stay
unmerged in one PEFT model, so one `generate` call can serve rows for the base and for several
adapters together (PEFT's mixed-adapter batches: `adapter_names=[...]`, `"__base__"` for base rows).

The checks read the adapter's config and safetensors header and the base's `config.json` (the base
is built on the meta device to list its modules): no weights load, so a bad adapter stops an import
or a server start at once with its name and the cause.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .checkpoints import CheckpointError, config_field

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_ROW = "__base__"  # PEFT's adapter name for rows that use the base model alone


class AdapterError(CheckpointError):
    """An adapter directory that is not a usable LoRA adapter of the given base."""


def base_module_names(base_dir: str | Path) -> frozenset[str]:
    """Names of every module of the PaliGemma model in `base_dir`, read from its config (no weights)."""
    return _module_names(str(base_dir))


@lru_cache(maxsize=8)  # several adapters of one base: build the meta model once
def _module_names(base_dir: str) -> frozenset[str]:
    import torch
    from transformers import AutoConfig, PaliGemmaForConditionalGeneration

    config = AutoConfig.from_pretrained(base_dir, local_files_only=True)
    if config.model_type != "paligemma":
        raise AdapterError(f"{base_dir}: model_type is {config.model_type!r}, expected 'paligemma'")
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    return frozenset(name for name, _ in model.named_modules() if name)


def _lora_config(path: Path):
    from peft import LoraConfig, PeftConfig

    config_file = path / ADAPTER_CONFIG
    peft_type = config_field(config_file, "peft_type", f"{path}: not a PEFT adapter ({ADAPTER_CONFIG} not found)",
                             AdapterError)
    if peft_type != "LORA":
        raise AdapterError(f"{config_file}: peft_type is {peft_type!r}; only LoRA adapters ('LORA') are served")
    try:
        config = PeftConfig.from_pretrained(path)
    except Exception as exc:  # PEFT raises several types for a malformed config
        raise AdapterError(f"{config_file}: not a valid LoRA config ({type(exc).__name__}: {exc})") from exc
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"{config_file}: not a LoRA config ({type(config).__name__})")
    return config


def _weight_modules(path: Path) -> set[str]:
    """The base-model module of every LoRA tensor (`base_model.model.<module>.lora_A.weight` -> `<module>`)."""
    from safetensors import safe_open

    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{path}: no adapter weights ({ADAPTER_WEIGHTS} not found)")
    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise AdapterError(f"{weights}: unreadable weights ({type(exc).__name__}: {exc})") from exc
    modules = set()
    for key in keys:
        name = key.removeprefix("base_model.model.")
        for marker in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector"):
            if marker in name:
                name = name.split(marker)[0]
                break
        modules.add(name)
    if not modules:
        raise AdapterError(f"{weights}: holds no tensors")
    return modules


def check_lora_dir(path: str | Path, base_dir: str | Path | None = None):
    """Check a PEFT LoRA adapter directory; with `base_dir`, also that the base has its target modules.

    Returns the adapter's `LoraConfig`. Raises AdapterError naming the file and the cause.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    path = Path(path)
    config = _lora_config(path)
    weight_modules = _weight_modules(path)
    if base_dir is None:
        return config
    modules = base_module_names(base_dir)
    missing = sorted(weight_modules - modules)
    if missing:
        raise AdapterError(
            f"{path}: the base {base_dir} has no module {missing[0]!r}"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: not an adapter of this base"
        )
    if not any(check_target_module_exists(config, name) for name in modules):
        raise AdapterError(f"{path}: target modules {config.target_modules!r} match no module of the base {base_dir}")
    return config


def attach_adapters(model, adapters: dict[str, str | Path]):
    """Wrap `model` in a PEFT model holding every adapter unmerged, named by the keys of `adapters`.

    Returns the PEFT model (in eval mode); `model` is modified in place. Rows of a `generate` call pick
    their adapter with `adapter_names=[...]`, `BASE_ROW` for the base alone.
    """
    from peft import PeftConfig, PeftModel

    items = list(adapters.items())
    if not items:
        return model
    (first_name, first_dir), rest = items[0], items[1:]
    config = PeftConfig.from_pretrained(first_dir)
    # The plain PeftModel class: its generate only adds the per-row adapter hooks. A task type (such
    # as CAUSAL_LM) would swap in a class that rewrites PaliGemma's generation inputs.
    config.task_type = None
    peft_model = PeftModel.from_pretrained(model, first_dir, adapter_name=first_name, config=config)
    for name, directory in rest:
        peft_model.load_adapter(directory, adapter_name=name)
    return peft_model.eval()
