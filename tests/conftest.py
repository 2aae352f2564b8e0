"""Shared fixtures: the offline tiny PaliGemma 2 and vae-oid.npz, built once per test run, and one real
`bentoml serve` on 127.0.0.1 serving them (tests/service and tests/ui)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
