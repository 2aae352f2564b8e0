#!/usr/bin/env python3
"""The project's version, and the image tag every Kubernetes overlay pins: one number, kept together.

A release is the git tag `v<version>` of a commit whose pyproject.toml says `<version>` and whose
kustomizations pin the image tag `<version>` (`<version>-hub` where they pin the slim image). The
release workflow refuses any other tag before it builds anything and pushes `:<version>`, so the
manifests of a release deploy the image that release pushed, never `:latest`.

    python scripts/release_version.py                 # print the version
    python scripts/release_version.py --set 1.2.3     # bump pyproject.toml and every kustomization
    python scripts/release_version.py --check v1.2.3  # exit 1 unless everything names 1.2.3

Standard library only: the release workflow runs it before installing anything.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HUB_SUFFIX = "-hub"  # the slim image's tags (release.yml: model_source hub)
VERSION_LINE = re.compile(r'^(version\s*=\s*")([^"]+)(")', re.M)
NEW_TAG = re.compile(r'^(\s*newTag:\s*)"?([^"\s#]+)"?', re.M)


def project_version(root: Path = ROOT) -> str:
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]


def kustomizations(root: Path = ROOT) -> list[Path]:
    return sorted((root / "deploy" / "kubernetes").rglob("kustomization.yaml"))


def pinned_tags(root: Path = ROOT) -> dict[Path, list[str]]:
    """The image tags (`images: - newTag`) of every kustomization that sets one."""
    tags = {path: NEW_TAG.findall(path.read_text()) for path in kustomizations(root)}
    return {path: [tag for _, tag in found] for path, found in tags.items() if found}


def problems(version: str, root: Path = ROOT) -> list[str]:
    """What does not name `version`: pyproject.toml, or a pinned tag other than VERSION[-hub]."""
    found = []
    if project_version(root) != version:
        found.append(f"pyproject.toml: version {project_version(root)}, not {version}")
    for path, tags in pinned_tags(root).items():
        for tag in tags:
            if tag not in (version, version + HUB_SUFFIX):
                found.append(f"{path.relative_to(root)}: newTag {tag}, not {version} (or {version}{HUB_SUFFIX})")
    return found


def set_version(version: str, root: Path = ROOT) -> None:
    """Write `version` into pyproject.toml and every kustomization's newTag (keeping a -hub suffix)."""
    if not re.fullmatch(r"\d+\.\d+\.\d+(?:[-.+][\w.]+)?", version):
        raise SystemExit(f"not a version: {version!r} (expected e.g. 1.2.3)")
    pyproject = root / "pyproject.toml"
    pyproject.write_text(VERSION_LINE.sub(lambda m: m.group(1) + version + m.group(3), pyproject.read_text(), count=1))

    def tag(match: re.Match) -> str:
        suffix = HUB_SUFFIX if match.group(2).endswith(HUB_SUFFIX) else ""
        return f'{match.group(1)}"{version}{suffix}"'

    for path in pinned_tags(root):
        path.write_text(NEW_TAG.sub(tag, path.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--set", metavar="VERSION", help="write VERSION everywhere")
    action.add_argument("--check", metavar="TAG", help="exit 1 unless the release tag TAG (v1.2.3) is the version")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.set:
        set_version(args.set, args.root)
    elif args.check:
        version = args.check.removeprefix("v")
        found = problems(version, args.root)
        if found:
            print(f"release tag {args.check} is not the version this commit pins; bump it first with "
                  f"`python scripts/release_version.py --set {version}`:", file=sys.stderr)
            print("\n".join(f"  {line}" for line in found), file=sys.stderr)
            return 1
    print(project_version(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
