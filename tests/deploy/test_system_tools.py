"""scripts/system_tools.sh (`make system-tools`, `make image-tools`): present tools pass silently; a
missing one, when not root, stops at once with the exact apt-get command to run. Every shell script of
the project passes shellcheck."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "system_tools.sh"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def run(*pairs: str, as_nobody: bool = False) -> subprocess.CompletedProcess:
    command = [*(NOBODY if as_nobody else []), "bash", str(SCRIPT), *pairs]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_present_tools_pass_without_installing_anything():
    sh = shutil.which("sh")
    result = run("bash=bash", f"{sh}=dash", as_nobody=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""


def test_a_missing_tool_stops_a_non_root_user_with_the_command_to_run(tmp_path):
    missing = tmp_path / "no-such-browser"
    result = run("bash=bash", "no-such-tool-for-tests=pkg-one", f"{missing}=pkg-two", as_nobody=True)
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
