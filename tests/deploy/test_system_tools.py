"""scripts/system_tools.sh (`make system-tools`, `make image-tools`): present tools pass silently; a
missing one, when not root, stops at once with the exact apt-get command to run. Every shell script of
the project passes shellcheck."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "system_tools.sh"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def public_dir():
    """A directory every user may enter, holding a copy of the script. The checkout (and pytest's
    tmp_path, mode 700) may lie where the unprivileged user cannot read: a root's home, a `mktemp -d`."""
    directory = Path(tempfile.mkdtemp(prefix="system-tools-"))
    try:
        directory.chmod(0o755)
        shutil.copy(SCRIPT, directory / SCRIPT.name)
        yield directory
    finally:
        shutil.rmtree(directory)


def run(public_dir: Path, *pairs: str) -> subprocess.CompletedProcess:
    """The script as the unprivileged user `nobody`, started inside `public_dir` (bash reports a
    working directory it cannot enter on stderr)."""
    command = [*NOBODY, "bash", str(public_dir / SCRIPT.name), *pairs]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=public_dir)


def test_present_tools_pass_without_installing_anything(public_dir):
    sh = shutil.which("sh")
    result = run(public_dir, "bash=bash", f"{sh}=dash")
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""


def test_a_missing_tool_stops_a_non_root_user_with_the_command_to_run(public_dir):
    missing = public_dir / "no-such-browser"
    result = run(public_dir, "bash=bash", "no-such-tool-for-tests=pkg-one", f"{missing}=pkg-two")
    assert result.returncode == 1
    assert "sudo apt-get update && sudo apt-get install -y -q pkg-one pkg-two" in result.stderr
    assert "Missing system tools: pkg-one pkg-two." in result.stderr, "only the missing ones"


def test_the_projects_shell_scripts_pass_shellcheck():
    scripts = sorted((ROOT / "scripts").rglob("*.sh")) + [ROOT / ".ci" / "run"]
    assert len(scripts) >= 4
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed: `make test` installs it"
    result = subprocess.run([shellcheck, "--format=gcc", *map(str, scripts)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
