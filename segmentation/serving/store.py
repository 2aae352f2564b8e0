"""The served models in the BentoML model store: found by tag, checked before serving.

`service.py` calls `preflight` when it is imported by a process that serves models: `bentoml serve`
itself (a missing or corrupt file stops the server at once with its name, instead of crashing the
engine worker, which BentoML would restart forever) and the engine's worker. The public service's
workers skip it (`checks_models`): the checks build an adapter's base model on the meta device, which
imports torch and transformers; so does a public tier served alone (`SEG_ENGINE_URL`) altogether.
"""

from __future__ import annotations

import sys
from pathlib import Path

import bentoml

from ..model.adapters import check_lora_dir
from ..model.checkpoints import CheckpointError, check_paligemma_dir, load_vae_checkpoint
from .gpu import GPUError, check_cuda_device
from .settings import Settings, adapter_tag, model_tag

VAE_FILE = "vae-oid.npz"


def stored(tag: str) -> bentoml.Model:
    try:
        return bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as exc:
        raise CheckpointError(
            f"model {tag!r} is not in the BentoML model store ({exc}); import it with scripts/import_models.py"
        ) from exc


def stored_path(tag: str) -> Path:
    return Path(stored(tag).path)


def adapter_base(adapter_id: str, settings: Settings) -> str:
    """The model id an imported adapter adapts (recorded by import_models.py); it must be served."""
    base = stored(adapter_tag(adapter_id)).info.metadata.get("base_model")
    if base not in settings.models:
        raise CheckpointError(
            f"adapter {adapter_id!r} adapts the model {base!r}, which is not served "
            f"(SEG_MODELS={','.join(settings.models)}): serve its base too, or drop the adapter from SEG_ADAPTERS"
        )
    return base


def worker_of(argv: list[str] | None = None) -> str | None:
    """The BentoML service this process is a worker of (BentoML starts each worker with
    `--service-name NAME`), or None for any other process (`bentoml serve` itself, a build, a test)."""
    argv = sys.argv if argv is None else argv
    if "--service-name" in argv[:-1]:
        return argv[argv.index("--service-name") + 1]
    return None


def checks_models(settings: Settings, engine_service: str, argv: list[str] | None = None) -> bool:
    """Whether this process checks the model files: never in a public tier served alone, otherwise
    in every process but the workers of services other than the engine."""
    if settings.engine_urls:
        return False
    return worker_of(argv) in (None, engine_service)


def preflight(settings: Settings) -> dict[str, str]:
    """Check every model file and the GPU now; stop with the reason. Returns each adapter's base."""
    try:
        if settings.model_source == "store":
            for model_id in settings.models:
                check_paligemma_dir(stored_path(model_tag(model_id)))
        bases = {adapter_id: adapter_base(adapter_id, settings) for adapter_id in settings.adapters}
        for adapter_id, base in bases.items():
            base_dir = stored_path(model_tag(base)) if settings.model_source == "store" else None
            check_lora_dir(stored_path(adapter_tag(adapter_id)), base_dir)
        load_vae_checkpoint(stored_path(settings.vae_tag) / VAE_FILE)
        # A GPU deployment whose driver is too old for torch's CUDA build stops here, not on the CPU.
        check_cuda_device(settings.device)
    except (CheckpointError, GPUError) as exc:
        raise SystemExit(f"cannot serve: {exc}") from None
    return bases


def load_mask_encoder(settings: Settings):
    """The mask encoder of the served vae-oid.npz, for /encode (small JAX on the calling process's CPU).
    Raises CheckpointError when the file has no usable encoder."""
    from ..model.encoder import MaskEncoder

    encoder = MaskEncoder.from_npz(stored_path(settings.vae_tag) / VAE_FILE)
    encoder.warmup()
    return encoder
