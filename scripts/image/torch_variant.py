#!/usr/bin/env python
"""Turn a bento's image build context into a variant with another torch build (CPU, or CUDA 12).

`bentoml build` locks torch from the package index, whose Linux x86_64 wheel is a CUDA 13 build: the
lock (env/python/requirements.txt) pins torch *and* its nvidia-*/cuda-*/triton wheels, so swapping the
torch wheel alone would still install gigabytes of CUDA libraries. This script locks again with uv,
keeping every other package at the version the bento locked, and writes the new lock into the
context. The generated Dockerfile is not touched: the image is built from the same Dockerfile.

    # CPU image for these machines (the +cpu wheel is only in the find-links folder here):
    python scripts/image/torch_variant.py build/context --torch 2.13.0+cpu --find-links /opt/wheels
    # CUDA 12.6 image for hosts whose NVIDIA driver is older than the 580 series:
    python scripts/image/torch_variant.py build/context --torch 2.13.0+cu126 \
        --index-url https://download.pytorch.org/whl/cu126

Wheels found through --find-links are copied into the context (env/python/wheels), because a build
sees nothing of the host. Prints the CUDA version of the new lock ("none" for a CPU lock); without
--torch, only prints the CUDA version of the context's lock (the image label of the release).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LOCK = Path("env/python/requirements.txt")
WHEELS = Path("env/python/wheels")
PINNED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.M)
# The runtime library that fixes which CUDA a torch build needs: nvidia-cuda-runtime (CUDA 13 wheels)
# or nvidia-cuda-runtime-cu12 (CUDA 12 wheels).
CUDA_RUNTIME = re.compile(r"^nvidia-cuda-runtime(?:-cu\d+)?==(\d+)\.(\d+)", re.M)


def pins(lock_text: str) -> dict[str, str]:
    """Package name (lower case) -> pinned version, for every `name==version` line of a lock."""
    return {name.lower(): version for name, version in PINNED.findall(lock_text)}


def cuda_version(lock_text: str) -> str:
    """`MAJOR.MINOR` of the CUDA runtime a lock installs, or "none" for a lock without one."""
    found = CUDA_RUNTIME.search(lock_text)
    return f"{found[1]}.{found[2]}" if found else "none"


def bento_path(dockerfile_text: str) -> str:
    """Where the generated Dockerfile puts the bento inside the image (its BENTO_PATH argument)."""
    found = re.search(r"^ARG BENTO_PATH=(\S+)$", dockerfile_text, re.M)
    if not found:
        raise SystemExit("the Dockerfile declares no BENTO_PATH")
    return found[1]


def relock(context: Path, torch: str, find_links: Path | None, index_url: str | None) -> str:
    """Lock the bento's requirements again with torch==`torch`; other packages keep their locked versions."""
    locked = (context / LOCK).read_text()
    requirements = context / "env" / "python" / "requirements.in"
    with tempfile.TemporaryDirectory() as temp:
        constraints = Path(temp) / "constraints.txt"
        # Only the versions carry over: the CUDA wheels drop out unless the new torch asks for them.
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in pins(locked).items()
                                       if name != "torch"))
        overrides = Path(temp) / "overrides.txt"
        overrides.write_text(f"torch=={torch}\n")
        uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))  # the venv's uv (BentoML's)
        command = [uv, "pip", "compile", str(requirements), "-c", str(constraints), "--overrides", str(overrides),
                   "--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28",
                   "--no-header", "--no-annotate", "--quiet"]
        if find_links:
            command += ["--find-links", str(find_links)]
        if index_url:
            command += ["--extra-index-url", index_url, "--index-strategy", "unsafe-best-match"]
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"uv pip compile failed:\n{result.stderr}")
    return result.stdout


def write_variant(context: Path, torch: str, find_links: Path | None = None, index_url: str | None = None) -> str:
    """Rewrite the lock of `context` for torch==`torch` (copying its wheel in); return its CUDA version."""
    body = relock(context, torch, find_links, index_url)
    if pins(body).get("torch") != torch:
        raise SystemExit(f"the new lock does not pin torch=={torch}")
    header = ["--index-url https://pypi.org/simple"]
    if index_url:
        header.append(f"--extra-index-url {index_url}")
    if find_links:
        wheels = context / WHEELS
        wheels.mkdir(parents=True, exist_ok=True)
        copied = [shutil.copy2(w, wheels) for w in sorted(find_links.glob(f"torch-{torch}-*.whl"))]
        if not copied:
            raise SystemExit(f"no torch-{torch} wheel in {find_links}")
        inside = bento_path((context / "env" / "docker" / "Dockerfile").read_text())
        header.append(f"--find-links {inside}/{WHEELS}")
    (context / LOCK).write_text("\n".join(header) + "\n" + body)
    return cuda_version(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("context", type=Path, help="build context written by scripts/bento_context.py")
    parser.add_argument("--torch", help="torch version to lock, e.g. 2.13.0+cpu or 2.13.0+cu126 (without it: "
                        "only print the CUDA version of the context's lock)")
    parser.add_argument("--find-links", type=Path, help="folder holding that torch wheel (copied into the context)")
    parser.add_argument("--index-url", help="extra package index serving that torch build (PyTorch's)")
    args = parser.parse_args(argv)
    if args.torch is None:
        print(cuda_version((args.context / LOCK).read_text()))
    else:
        print(write_variant(args.context, args.torch, args.find_links, args.index_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
