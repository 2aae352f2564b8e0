#!/usr/bin/env python
"""`bentoml build` with the models of SEG_MODELS and the LoRA adapters of SEG_ADAPTERS recorded in the
bento and named in its image.

SEG_MODEL_SOURCE is baked in too: a `hub` bento records no PaliGemma weights and downloads them at
start.

BentoML records the models the service declares (chosen by SEG_MODELS when service.py is imported)
but a bentofile's `envs` are static: this script adds SEG_MODELS, SEG_ADAPTERS (and SEG_VAE_TAG) to
them in a temporary copy of bentofile.yaml, so the container serves exactly what was baked into it.

    SEG_MODELS=google/paligemma2-3b-mix-448 python scripts/build_bento.py   # prints the bento tag
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segmentation.serving.settings import Settings  # noqa: E402


def main() -> int:
    settings = Settings.from_env()
    config = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    ours = {"SEG_MODELS": ",".join(settings.models), "SEG_ADAPTERS": ",".join(settings.adapters),
            "SEG_VAE_TAG": settings.vae_tag,
            "SEG_MODEL_SOURCE": settings.model_source}
    envs = [e for e in config.get("envs", []) if e["name"] not in ours]
    envs += [{"name": name, "value": value} for name, value in ours.items()]
    config["envs"] = envs
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=ROOT, delete=False) as f:
        yaml.safe_dump(config, f, sort_keys=False)
        temp = Path(f.name)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "bentoml", "build", "-f", str(temp), "--output", "tag", str(ROOT)],
            capture_output=True, text=True, env=os.environ,
        )
    finally:
        temp.unlink()
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        sys.stderr.write(result.stdout)
        return result.returncode
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
