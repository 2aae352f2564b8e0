"""Shared fixtures: the offline tiny PaliGemma 2 and vae-oid.npz, built once per test run, and one real
`bentoml serve` on 127.0.0.1 serving them (tests/service and tests/ui)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The suite's device. On a CUDA host the library's defaults would move it to the GPU and to bfloat16
# (PaliGemmaEngine.from_pretrained and Segmenter.from_pretrained: device "cuda" when present, then
# bfloat16; a served test server's SEG_DEVICE=auto; invariant.describe; JAX, which the mask decoder uses,
# takes a GPU when its CUDA plugin is installed): float32 equality tests would then fail on bfloat16
# arithmetic rather than on bugs, and the host-sync guard would watch a step that a graph replays. So the
# suite hides the GPUs from itself and from every process it starts, unless asked: SEG_TEST_DEVICE=cuda
# (the engines' own defaults then apply), or a session that selects only the `cuda` tests (`pytest -m cuda`:
# tests/model/test_cuda.py, skipped without CUDA).
TEST_DEVICE = os.environ.get("SEG_TEST_DEVICE", "cpu").strip().lower() or "cpu"
if TEST_DEVICE not in ("cpu", "cuda"):
    raise pytest.UsageError(f"SEG_TEST_DEVICE must be cpu or cuda, not {TEST_DEVICE!r}")


def cuda_session(markexpr: str) -> bool:
    """Whether the session asks for the GPU: SEG_TEST_DEVICE=cuda, or `-m cuda` (the cuda tests only)."""
    return TEST_DEVICE == "cuda" or markexpr.strip() == "cuda"


def pytest_configure(config):
    # Before any test module imports torch, JAX or Triton (each reads these once).
    if cuda_session(config.option.markexpr or ""):
        # The CUDA tests need Triton's compiler, not its interpreter (the CPU invariance tests skip).
        os.environ.setdefault("TRITON_INTERPRET", "0")
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # torch, JAX and test servers see no GPU
        os.environ["SEG_DEVICE"] = "cpu"  # test servers (bentoml serve) inherit the environment
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        # Triton decides at its import whether kernels run in its CPU interpreter; torch.compile (tests of
        # the graph engine) imports it too, so the batch-invariance tests' setting comes before any test.
        os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "service"))


@pytest.fixture(scope="session")
def tiny_fixtures(tmp_path_factory) -> Path:
    """DIR with DIR/paligemma (random PaliGemma 2, real tokens) and DIR/vae-oid.npz (the trained
    fixture VAE, so decoded masks look like masks and /encode round-trips)."""
    from make_tiny_model import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("fixtures"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def trained_vae() -> Path:
    """The fixture VQ-VAE trained on synthetic shapes (scripts/train_vae_fixture.py): trained once per
    machine and script version, then taken from the cache (~/.cache/paligemma-seg)."""
    from train_vae_fixture import trained_vae_npz

    return trained_vae_npz(seed=0)


@pytest.fixture(scope="session")
def segmenter(tiny_fixtures):
    from segmentation import Segmenter

    return Segmenter.from_pretrained(tiny_fixtures / "paligemma", tiny_fixtures / "vae-oid.npz")


@pytest.fixture(scope="session")
def server_home(tmp_path_factory, tiny_fixtures) -> Path:
    """A BentoML home with the tiny fixtures imported as the demo model."""
    from servers import import_fixtures

    home = tmp_path_factory.mktemp("bentoml-home")
    import_fixtures(home, tiny_fixtures)
    return home


@pytest.fixture(scope="session")
def server(server_home):
    """The shared server; `localhost` is allow-listed for image_url tests against a local site."""
    from servers import kill_tree, start_server

    srv = start_server(server_home, {"SEG_URL_ALLOWLIST": "localhost"})
    yield srv
    kill_tree(srv.process.pid)


@pytest.fixture(scope="session")
def lora_adapters(tiny_fixtures, tmp_path_factory) -> dict[str, Path]:
    """Two random LoRA adapters of the tiny model (non-zero weights: they change answers)."""
    from lora import write_random_adapter

    out = tmp_path_factory.mktemp("adapters")
    return {name: write_random_adapter(tiny_fixtures / "paligemma", out / name, seed=seed)
            for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="session")
def finetuned_adapter(tiny_fixtures, tmp_path_factory) -> Path:
    """A LoRA adapter trained by scripts/finetune.py for a few steps on a small synthetic set."""
    import subprocess

    out = tmp_path_factory.mktemp("finetune")
    script = [sys.executable, str(ROOT / "scripts" / "finetune.py")]
    subprocess.run([*script, "--write-synthetic", str(out / "data"), "--examples", "4"], check=True,
                   capture_output=True)
    result = subprocess.run(
        [*script, "--base", str(tiny_fixtures / "paligemma"), "--data", str(out / "data" / "train.jsonl"),
         "--out", str(out / "adapter"), "--steps", "12", "--batch-size", "2", "--learning-rate", "1e-2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    (out / "finetune.log").write_text(result.stdout + result.stderr)
    return out / "adapter"


@pytest.fixture(scope="session")
def adapter_home(tmp_path_factory, tiny_fixtures, lora_adapters, finetuned_adapter) -> Path:
    """A BentoML home with the demo model, two random LoRA adapters and a fine-tuned one imported."""
    from lora import ADAPTERS, FINETUNED, import_adapter
    from servers import import_fixtures

    home = tmp_path_factory.mktemp("adapter-home")
    import_fixtures(home, tiny_fixtures)
    for adapter_id, name in ADAPTERS.items():
        import_adapter(home, lora_adapters[name], adapter_id)
    import_adapter(home, finetuned_adapter, FINETUNED)
    return home


@pytest.fixture(scope="session")
def adapter_server(adapter_home):
    """A server of the demo model and its adapters (SEG_ADAPTERS), shared by tests/service and tests/ui."""
    from lora import SERVED_ADAPTERS
    from servers import kill_tree, start_server

    srv = start_server(adapter_home, {"SEG_ADAPTERS": ",".join(SERVED_ADAPTERS)})
    yield srv
    kill_tree(srv.process.pid)
