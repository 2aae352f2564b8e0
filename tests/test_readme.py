"""The README's shell and Python examples, run against a real demo server (the idea of LitServe's
test_readme): a quickstart that drifts from the code fails here.

Every ```bash and ```python block runs, in order of appearance, unless the line before it says
`<!-- readme-test: skip (why) -->` (a block that starts a server, needs Docker or the hub, ...) or
`<!-- tested: tests/... (how) -->` (a block another test runs, e.g. in a fresh virtual environment).
Blocks run in a scratch folder that links the repository's files, with the demo server's address in
place of http://127.0.0.1:3000 and the tiny fixtures in place of the placeholder model paths.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = ("bash", "python")
SKIP = re.compile(
    r"<!--\s*(?:readme-test:\s*skip\s*\((?P<why>[^)]+)\)|tested:\s*(?P<elsewhere>tests/\S+ [^>]+?))\s*-->"
)
FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    code: str
    skip_reason: str | None


def readme_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening or not opening["lang"]:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.search(before)
        reason = (skip["why"] or skip["elsewhere"]) if skip else None
        blocks.append(Block(i + 1, opening["lang"], "\n".join(lines[i + 1:end]), reason))
        i = end + 1
    return blocks


BLOCKS = [b for b in readme_blocks(README.read_text()) if b.lang in RUNNABLE]
RUN = [b for b in BLOCKS if b.skip_reason is None]


def test_every_example_runs_or_says_why_not():
    assert RUN, "no runnable README example found"
    for block in BLOCKS:
        assert block.skip_reason is None or len(block.skip_reason.strip()) > 10, block


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch folder that sees the repository's files; what the examples write stays here."""
    work = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        if entry.name not in (".git",):
            (work / entry.name).symlink_to(entry)
    return work


def substitute(code: str, server_url: str, fixtures: Path) -> str:
    return (code.replace("http://127.0.0.1:3000", server_url)
            .replace("path/to/paligemma2-3b-mix-448", str(fixtures / "paligemma"))
            .replace("path/to/vae-oid.npz", str(fixtures / "vae-oid.npz"))
            .replace(".fixtures/tiny", str(fixtures)))


@pytest.mark.parametrize("block", RUN, ids=[f"README.md:{b.line}-{b.lang}" for b in RUN])
def test_readme_example(block, server, tiny_fixtures, workdir):
    code = substitute(block.code, server.url, tiny_fixtures)
    env = {**os.environ, "KEY": "readme-example-key", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if block.lang == "python":
        command = [sys.executable, "-c", code]
    else:
        # Each command must succeed, and curl must fail on an HTTP error instead of printing it.
        prelude = 'set -euo pipefail\ncurl() { command curl --fail-with-body --show-error "$@"; }\n'
        command = ["bash", "-c", prelude + code]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"README.md line {block.line}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
