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

import re
from functools import lru_cache
from pathlib import Path

from .checkpoints import CheckpointError, config_field

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_ROW = "__base__"  # PEFT's adapter name for rows that use the base model alone
# A rank-1 adapter with zero B on every projection of the language model's layers, never named by a row:
# it makes PEFT wrap those layers before the graph engine captures its step, so adapters loaded while
# serving only add entries to wrappers that already exist (the captured graphs call the same modules).
RESERVE_ADAPTER = "slots_reserve"
RESERVE_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


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


def attach_adapters(model, adapters: dict[str, str | Path], *, reserve: bool = False):
    """Wrap `model` in a PEFT model holding every adapter unmerged, named by the keys of `adapters`.

    Returns the PEFT model (in eval mode); `model` is modified in place. Rows of a `generate` call pick
    their adapter with `adapter_names=[...]`, `BASE_ROW` for the base alone. `reserve`: add
    `RESERVE_ADAPTER` (every projection of the language model wrapped, for adapters loaded later), also
    when `adapters` is empty.
    """
    from peft import LoraConfig, PeftConfig, PeftModel

    items = list(adapters.items())
    if not items and not reserve:
        return model
    if not items:
        return PeftModel(model, _reserve_config(LoraConfig), adapter_name=RESERVE_ADAPTER).eval()
    (first_name, first_dir), rest = items[0], items[1:]
    config = PeftConfig.from_pretrained(first_dir)
    # The plain PeftModel class: its generate only adds the per-row adapter hooks. A task type (such
    # as CAUSAL_LM) would swap in a class that rewrites PaliGemma's generation inputs.
    config.task_type = None
    peft_model = PeftModel.from_pretrained(model, first_dir, adapter_name=first_name, config=config)
    for name, directory in rest:
        peft_model.load_adapter(directory, adapter_name=name)
    if reserve:
        peft_model.add_adapter(RESERVE_ADAPTER, _reserve_config(LoraConfig))
    return peft_model.eval()


def _reserve_config(lora_config_class):
    # init_lora_weights=True: B starts at zero, so the reserve adds nothing to any call that meets it.
    return lora_config_class(r=1, lora_alpha=1, target_modules=RESERVE_TARGETS, init_lora_weights=True)


# --- adapters loaded while serving --------------------------------------------------------------------

_LORA_TENSOR = ("lora_A.weight", "lora_B.weight")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub_name(model_id: str) -> str:
    return model_id.rstrip("/").rsplit("/", 1)[-1].lower()


def check_runtime_adapter(path: str | Path, model, *, covered: frozenset[str], max_rank: int, label: str,
                          base_id: str | None = None):
    """Check an adapter directory against a loaded base before it is loaded while serving: a PEFT LoRA
    (no variant such as DoRA, no lora_B bias), rank <= `max_rank`, every tensor on a linear layer of `model`
    (the unwrapped PaliGemma) with that layer's shape, and every layer of the language model it adapts in
    `covered` (the layers with stacked weights; its vision-tower layers run through PEFT's hooks). When its
    `base_model_name_or_path` is a hub id (`owner/name`) and `base_id` is given, its last part must be the
    base's (`google/paligemma2-3b-pt-224` is no base of `google/paligemma2-3b-mix-448`); a local path
    there says nothing (shapes decide).

    Returns the `LoraConfig`. Raises AdapterError with a message naming `label` (never a server path).
    """
    import torch
    from safetensors import safe_open

    path = Path(path)
    try:
        config = _lora_config(path)
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise AdapterError(f"no adapter weights ({ADAPTER_WEIGHTS} not found)")
    except AdapterError as exc:
        raise AdapterError(f"{label}: {_without_paths(str(exc), path)}") from exc
    if getattr(config, "use_dora", False):
        raise AdapterError(f"{label}: a DoRA adapter (use_dora); only plain LoRA fits the stacked weights")
    ranks = [config.r, *(getattr(config, "rank_pattern", None) or {}).values()]
    if max(ranks) > max_rank:
        raise AdapterError(f"{label}: rank {max(ranks)} exceeds the slot rank {max_rank} (SEG_MAX_LORA_RANK)")
    named = getattr(config, "base_model_name_or_path", None) or ""
    if base_id and _HUB_ID.fullmatch(named) and not Path(named).exists() and _hub_name(named) != _hub_name(base_id):
        raise AdapterError(f"{label}: an adapter of {named}, not of the served base {base_id}")
    modules = dict(model.named_modules())
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:
        raise AdapterError(f"{label}: unreadable weights ({type(exc).__name__})") from exc
    if not shapes:
        raise AdapterError(f"{label}: {ADAPTER_WEIGHTS} holds no tensors")
    for key, shape in sorted(shapes.items()):
        name = key.removeprefix("base_model.model.")
        kind = next((k for k in _LORA_TENSOR if name.endswith("." + k)), None)
        if kind is None:
            raise AdapterError(f"{label}: tensor {name} is not a plain LoRA weight (lora_A/lora_B of a linear "
                               "layer; embedding LoRA, biases and DoRA magnitudes are not served while loading "
                               "at runtime)")
        module_name = name[: -len(kind) - 1]
        module = modules.get(module_name)
        module = getattr(module, "base_layer", module)
        if not isinstance(module, torch.nn.Linear):
            raise AdapterError(f"{label}: the base has no linear layer {module_name}: not an adapter of this base")
        if ".language_model." in f".{module_name}" and module_name not in covered:
            raise AdapterError(f"{label}: it adapts {module_name}, a layer of the language model the stacked "
                               "weights do not cover (only the attention and MLP projections)")
        expected_in = kind == "lora_A.weight" and (len(shape) != 2 or shape[1] != module.in_features)
        expected_out = kind == "lora_B.weight" and (len(shape) != 2 or shape[0] != module.out_features)
        if expected_in or expected_out:
            want = (f"[r, {module.in_features}]" if kind == "lora_A.weight" else f"[{module.out_features}, r]")
            raise AdapterError(f"{label}: {name} has shape {list(shape)}, the base's layer needs {want}: "
                               "not an adapter of this base")
        if shape[0 if kind == "lora_A.weight" else 1] > max_rank:
            raise AdapterError(f"{label}: {name} has rank {shape[0 if kind == 'lora_A.weight' else 1]}, above the "
                               f"slot rank {max_rank} (SEG_MAX_LORA_RANK)")
    return config


def _without_paths(message: str, path: Path) -> str:
    """A check's message with the directory's server path taken out (the client named it otherwise)."""
    return message.replace(str(path / ADAPTER_CONFIG), ADAPTER_CONFIG).replace(str(path) + ": ", "").replace(
        str(path), "the directory")
