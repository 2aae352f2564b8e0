"""Shared fixtures: the offline tiny PaliGemma 2 and vae-oid.npz, built once per test run."""

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
    """DIR with DIR/paligemma (random PaliGemma 2, real tokens) and DIR/vae-oid.npz."""
    from make_tiny_model import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("fixtures"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def segmenter(tiny_fixtures):
    from segmentation import Segmenter

    return Segmenter.from_pretrained(tiny_fixtures / "paligemma", tiny_fixtures / "vae-oid.npz")
