"""docs/deployment.md: its configuration table lists every setting of the service with the default the
code uses, and the commands it gives name files, overlays and flags that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "deployment.md"
ROW = re.compile(r"^\| `(\w+)` \| (.+?) \| .+ \|$", re.M)


def table() -> dict[str, str]:
    return {name: default.strip() for name, default in ROW.findall(DOC.read_text())}


def test_configuration_table_has_every_setting_with_its_default():
    from segmentation.serving.settings import ENV_DOCS

    documented = table()
    missing = [name for name in ENV_DOCS if name not in documented]
    assert not missing, f"settings missing from {DOC.name}: {missing}"
    wrong = {name: (documented[name], default) for name, (default, _) in ENV_DOCS.items()
             if documented[name] != (f"`{default}`" if default else "(empty)")}
    assert not wrong, f"documented default != code default: {wrong}"
    for name in ("HF_HOME", "HF_TOKEN", "HF_TOKEN_FILE", "JAX_PLATFORMS"):
        assert name in documented


def test_paths_and_overlays_the_doc_names_exist():
    text = DOC.read_text()
    for path in sorted(set(re.findall(r"(?<![\w/.])((?:deploy/kubernetes|scripts|docs|\.github)/[\w./-]*\w)", text))):
        assert (ROOT / path).exists(), f"{DOC.name} names {path}, which does not exist"
    for overlay in ("gpu", "hub-cache"):
        assert f"kubectl -n segmentation apply -k deploy/kubernetes/overlays/{overlay}" in text
    assert "kubectl -n segmentation create secret generic paligemma-segmentation" in text
