#!/usr/bin/env python
"""Import PaliGemma models and the vae-oid.npz mask decoder into the BentoML model store.

    # the real model (gated: accept the licence on the Hub, then export HF_TOKEN=...)
    python scripts/import_models.py --hub google/paligemma2-3b-mix-448
    # the mask decoder big_vision publishes
    python scripts/import_models.py --vae-url https://storage.googleapis.com/big_vision/paligemma/vae-oid.npz
    # a local directory (save_pretrained layout), served under a model id of your choice
    python scripts/import_models.py --local .fixtures/tiny/paligemma --as demo/paligemma2-tiny-random \
        --vae-file .fixtures/tiny/vae-oid.npz
    # a PEFT LoRA adapter of an imported model, served under an adapter id (SEG_ADAPTERS)
    python scripts/import_models.py --adapter out/my-lora --base demo/paligemma2-tiny-random --as acme/my-lora

Tags: a model id's last part, lower-cased (`google/paligemma2-3b-mix-448` -> `paligemma2-3b-mix-448`),
`lora-` and the same for an adapter id (`acme/my-lora` -> `lora-my-lora`; its base model id is
recorded in the metadata as `base_model`), and `vae-oid` for the decoder. The store is
$BENTOML_HOME/models (default ~/bentoml).
"""

from __future__ import annotations

import argparse
import fnmatch
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segmentation.model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, check_lora_dir  # noqa: E402
from segmentation.serving.settings import VAE_TAG, adapter_tag, model_tag, read_secret  # noqa: E402

VAE_FILE = "vae-oid.npz"
# Not copied into the store: the Hub cache's own bookkeeping and model cards.
SKIPPED = (".cache", "*.md")
CHUNK = 8 << 20


def progress_bar(total: int | None, description: str):
    """A byte counter on stderr (a 3B model is gigabytes: its copy takes minutes on a slow disk)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, leave=True,
                mininterval=0.5)


def files_to_copy(source: Path) -> list[Path]:
    """Every file under `source` but those SKIPPED (a name matching at any depth), sorted."""
    return sorted(
        path for path in source.rglob("*")
        if path.is_file() and not any(fnmatch.fnmatch(part, pattern) for part in path.relative_to(source).parts
                                      for pattern in SKIPPED)
    )


def copy_with_progress(source: Path, dest: Path, description: str) -> None:
    """Copy the files under `source` into `dest` (same layout), showing the bytes copied."""
    files = files_to_copy(source)
    with progress_bar(sum(f.stat().st_size for f in files), description) as bar:
        for path in files:
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            with path.open("rb") as src, target.open("wb") as out:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            shutil.copystat(path, target)


def import_paligemma(source: Path, model_id: str, *, origin: str) -> str:
    """Copy a PaliGemma directory into the store under `model_tag(model_id)`; return the tag."""
    import bentoml

    if not (source / "config.json").is_file():
        raise SystemExit(f"{source} holds no PaliGemma model (no config.json)")
    labels = {"kind": "paligemma", "source": origin}
    with bentoml.models.create(model_tag(model_id), labels=labels, metadata={"model_id": model_id}) as model:
        copy_with_progress(source, Path(model.path), f"copying {model_id} into the model store")
    return str(model.tag)


def import_adapter(source: Path, base_id: str, adapter_id: str) -> str:
    """Check a LoRA adapter against its base (which must be in the store) and store it; return the tag."""
    import bentoml

    try:
        base = bentoml.models.get(model_tag(base_id))
    except bentoml.exceptions.NotFound:
        raise SystemExit(
            f"base model {base_id!r} is not in the model store: import it first (--local or --hub)"
        ) from None
    try:
        config = check_lora_dir(source, base.path)
    except AdapterError as exc:
        raise SystemExit(f"refused: {exc}") from None
    labels = {"kind": "lora-adapter", "base": model_tag(base_id)}
    metadata = {"adapter_id": adapter_id, "base_model": base_id, "rank": config.r}
    with bentoml.models.create(adapter_tag(adapter_id), labels=labels, metadata=metadata) as model:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(source / name, Path(model.path) / name)
    return str(model.tag)


def download_hub(model_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    token = read_secret("HF_TOKEN", "HF_TOKEN_FILE")
    return Path(snapshot_download(
        model_id, revision=revision, token=token,
        allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"],
    ))


def import_vae(npz: Path, *, origin: str) -> str:
    import bentoml

    from segmentation.model.vae import MaskDecoder

    MaskDecoder.from_npz(npz)  # refuse a file that is not a vae-oid checkpoint
    with bentoml.models.create(VAE_TAG, labels={"kind": "mask-decoder", "source": origin}) as model:
        shutil.copyfile(npz, Path(model.path) / VAE_FILE)
    return str(model.tag)


def download_url(url: str, dest: Path) -> Path:
    import httpx

    with httpx.stream("GET", url, follow_redirects=True, timeout=60) as response:
        response.raise_for_status()
        size = response.headers.get("content-length", "")
        with dest.open("wb") as out, progress_bar(int(size) if size.isdigit() else None,
                                                  f"downloading {dest.name}") as bar:
            for chunk in response.iter_bytes():
                out.write(chunk)
                bar.update(len(chunk))
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hub", metavar="MODEL_ID", action="append", default=[],
                        help="Hugging Face model id to download and import (repeatable)")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) for --hub")
    parser.add_argument("--local", type=Path, help="local PaliGemma directory to import")
    parser.add_argument("--as", dest="as_id", metavar="MODEL_ID", help="model id to serve --local or --adapter under")
    parser.add_argument("--adapter", type=Path, help="PEFT LoRA adapter directory to import (needs --base, --as)")
    parser.add_argument("--base", metavar="MODEL_ID", help="the imported model id the --adapter was trained on")
    parser.add_argument("--vae-file", type=Path, help="local vae-oid.npz to import")
    parser.add_argument("--vae-url", help="URL of vae-oid.npz to download and import")
    args = parser.parse_args(argv)
    if not (args.hub or args.local or args.vae_file or args.vae_url or args.adapter):
        parser.error("nothing to import: give --hub, --local, --adapter, --vae-file or --vae-url")
    if (args.local or args.adapter) and not args.as_id:
        parser.error("--local and --adapter need --as MODEL_ID (the id clients select it by)")
    if args.local and args.adapter:
        parser.error("--local and --adapter each need their own --as: import them one at a time")
    if args.adapter and not args.base:
        parser.error("--adapter needs --base MODEL_ID (the served model it adapts)")

    for model_id in args.hub:
        print(f"imported {import_paligemma(download_hub(model_id, args.revision), model_id, origin='hub')}")
    if args.local:
        print(f"imported {import_paligemma(args.local, args.as_id, origin='local')}")
    if args.adapter:
        print(f"imported {import_adapter(args.adapter, args.base, args.as_id)}")
    if args.vae_file:
        print(f"imported {import_vae(args.vae_file, origin='file')}")
    if args.vae_url:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"imported {import_vae(download_url(args.vae_url, Path(tmp) / VAE_FILE), origin=args.vae_url)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
