"""The original FastAPI service (github.com/JoeJoe1313/PaliGemma-Image-Segmentation, commit 1d1e90a) served
on 127.0.0.1 beside ours, on the same random fixture model, for scripts/benchmark.py `--seed-dir DIR`.

DIR is a checkout the user provides (its `app/` and `requirements.txt`); nothing of it is kept here.
The service loads its model on every request (`from_pretrained(MODEL_ID, cache_dir=MODELS_DIR/huggingface,
local_files_only=True)`, bfloat16) and generates a fixed 100 tokens at most, then decodes masks with its
own VQ-VAE code (`MODELS_DIR/vae-oid.npz`). To serve our fixture to it:

- its requirements install into a scratch virtual environment, except its `torch==2.7.0` pin: the
  machine's own CPU torch wheel stands in (the pin's Linux wheel is the CUDA build, gigabytes);
- the fixture is laid out as a Hugging Face cache entry (`models--<org>--<name>/snapshots/<rev>`) under
  an id ending in the image size (`-224`), which the service parses; for its transformers 4.51 the
  processor's settings are written as `preprocessor_config.json` (not nested in `processor_config.json`)
  and the tokenizer's extra
  special tokens are named rather than listed;
- prompts go to it as the model reads them (`segment cat ; dog`): the service passes them through.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REVISION = "0" * 40  # any commit-shaped name: the cache entry is ours


def ensure_venv(seed_dir: Path, venv: Path, log=print) -> Path:
    """The scratch venv's python, installing the service's requirements once (torch: see the docstring)."""
    python = venv / "bin" / "python"
    stamp = venv / ".seed-installed"
    if stamp.is_file() and stamp.read_text() == (seed_dir / "requirements.txt").read_text():
        return python
    requirements = [line for line in (seed_dir / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.strip().startswith("#")]
    requirements = ["torch" if r.split("==")[0].strip() == "torch" else r.strip() for r in requirements]
    log(f"[seed] installing {len(requirements)} requirements into {venv} (a few minutes, once)")
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], check=True)
    stamp.write_text((seed_dir / "requirements.txt").read_text())
    return python


def model_id_for(image_size: int) -> str:
    return f"demo/paligemma2-random-{image_size}"


def lay_out_models(fixtures: Path, models_dir: Path, image_size: int) -> str:
    """MODELS_DIR for the service: a Hugging Face cache entry of the fixture, and vae-oid.npz; returns the id."""
    model_id = model_id_for(image_size)
    entry = models_dir / "huggingface" / ("models--" + model_id.replace("/", "--"))
    snapshot = entry / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(REVISION)
    for path in (fixtures / "paligemma").iterdir():
        if path.name not in ("tokenizer_config.json", "processor_config.json"):
            (snapshot / path.name).symlink_to(path.resolve())
    # transformers 5 lists extra special tokens; 4.51 wants them named ({"image_token": "<image>"}).
    tokenizer = json.loads((fixtures / "paligemma" / "tokenizer_config.json").read_text())
    tokenizer["extra_special_tokens"] = {"image_token": tokenizer.get("image_token", "<image>")}
    (snapshot / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    processor = json.loads((fixtures / "paligemma" / "processor_config.json").read_text())
    image_processor = {**processor["image_processor"], "processor_class": "PaliGemmaProcessor"}
    (snapshot / "preprocessor_config.json").write_text(json.dumps(image_processor))
    (snapshot / "processor_config.json").write_text(json.dumps({"processor_class": "PaliGemmaProcessor"}))
    (models_dir / "vae-oid.npz").symlink_to((fixtures / "vae-oid.npz").resolve())
    return model_id


@contextlib.contextmanager
def served_seed(seed_dir: Path, python: Path, fixtures: Path, image_size: int, ready_timeout: float = 300):
    """uvicorn serving the original app on a free 127.0.0.1 port; yields (url, seconds to ready)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from servers import free_port, kill_tree

    with tempfile.TemporaryDirectory(prefix="seed-service-") as tmp:
        models_dir = Path(tmp) / "models"
        model_id = lay_out_models(fixtures, models_dir, image_size)
        port = free_port()
        log_path = Path(tmp) / "uvicorn.log"
        env = {**os.environ, "MODEL_ID": model_id, "MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1",
               "JAX_PLATFORMS": "cpu"}
        env.pop("PYTHONPATH", None)
        start = time.perf_counter()
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [str(python), "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
                cwd=seed_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the original service exited: {log_path.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/", timeout=5).status_code == 200:
                        break
                if time.perf_counter() - start > ready_timeout:
                    raise TimeoutError(f"the original service was not ready in {ready_timeout}s")
                time.sleep(0.5)
            yield url, time.perf_counter() - start
        finally:
            kill_tree(process.pid)


def seed_prompt(prompt: str) -> str:
    """What the original service must be sent for the model to read what ours reads for `prompt`."""
    from segmentation.model.prompts import parse_prompt

    return parse_prompt(prompt).text


# Run inside the scratch venv: the service's own model loading and its generate call, counting tokens.
_COUNT_TOKENS = """
import io, json, sys, torch
from PIL import Image
from transformers.image_utils import load_image
from app.segmentation import load_model_and_processor
model_id, model_dir, pairs_path = sys.argv[1:4]
model, processor = load_model_and_processor(model_id, model_dir, "")
counts = []
for image_path, prompt in json.load(open(pairs_path)):
    image = load_image(Image.open(image_path))
    inputs = processor(text=prompt, images=image, return_tensors="pt").to(torch.bfloat16).to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=100, do_sample=False)[0][inputs["input_ids"].shape[-1]:]
    ids = out.tolist()
    eos = processor.tokenizer.eos_token_id
    counts.append(ids.index(eos) if eos in ids else len(ids))
print(json.dumps(counts))
"""


def count_tokens(seed_dir: Path, python: Path, fixtures: Path, image_size: int,
                 pairs: list[tuple[bytes, str]]) -> list[int]:
    """Tokens the original service generates (before its end token) for each (image bytes, prompt) pair,
    by its own model loading and `generate` call in its venv."""
    with tempfile.TemporaryDirectory(prefix="seed-tokens-") as tmp:
        models_dir = Path(tmp) / "models"
        model_id = lay_out_models(fixtures, models_dir, image_size)
        listed = []
        for index, (data, prompt) in enumerate(pairs):
            path = Path(tmp) / f"{index}.img"
            path.write_bytes(data)
            listed.append((str(path), seed_prompt(prompt)))
        (Path(tmp) / "pairs.json").write_text(json.dumps(listed))
        env = {**os.environ, "MODEL_ID": model_id, "MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1",
               "JAX_PLATFORMS": "cpu"}
        env.pop("PYTHONPATH", None)
        arguments = [model_id, str(models_dir / "huggingface"), str(Path(tmp) / "pairs.json")]
        done = subprocess.run(
            [str(python), "-c", _COUNT_TOKENS, *arguments],
            cwd=seed_dir, env=env, capture_output=True, text=True,
        )
        if done.returncode:
            raise RuntimeError(f"counting the original service's tokens failed: {done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
