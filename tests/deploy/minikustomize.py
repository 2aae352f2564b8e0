"""The subset of `kustomize build` that deploy/kubernetes uses, for tests on machines without kustomize.

Supported kustomization fields: `resources` (files, or directories holding a kustomization),
`patches` (strategic-merge patch files given by `path`, each targeting the resource of its kind and
name) and `images` (`name` -> `newName` / `newTag` / `digest`). Anything else is refused, so a
kustomization never silently renders differently here than with kustomize.

Strategic merge follows the Kubernetes rules for the fields the patches touch: lists with a merge key
(containers and env by `name`, volumeMounts by `mountPath`, ...) merge item by item, `$patch: delete`
removes an item, a `null` value removes a field, other lists and scalars are replaced.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}

# patchMergeKey of the Kubernetes API types, for the list fields these manifests may patch.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
}


class KustomizeError(ValueError):
    pass


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def read_kustomization(directory: Path) -> dict:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory} has no kustomization.yaml")
    kustomization = yaml.safe_load(path.read_text()) or {}
    unknown = set(kustomization) - SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(f"{path}: fields this renderer does not implement: {sorted(unknown)}")
    if kustomization.get("kind") != "Kustomization":
        raise KustomizeError(f"{path}: kind is not Kustomization")
    return kustomization


def referenced_files(directory: Path) -> list[Path]:
    """Every file and directory a kustomization names (resources and patches), resolved."""
    kustomization = read_kustomization(directory)
    paths = [directory / entry for entry in kustomization.get("resources", [])]
    for patch in kustomization.get("patches", []):
        paths.append(directory / patch["path"])
    return paths


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    if isinstance(patch, dict):
        directive = patch.get("$patch")
        if directive == "replace":
            return strip_directives(patch)
        if directive not in (None, "merge"):
            raise KustomizeError(f"unsupported $patch directive {directive!r} at {field!r}")
        merged = copy.deepcopy(base) if isinstance(base, dict) else {}
        for key, value in patch.items():
            if key.startswith("$"):
                continue
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = strip_directives(value)
        return merged
    if isinstance(patch, list) and isinstance(base, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged = copy.deepcopy(base)
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise KustomizeError(f"an item of {field!r} lacks its merge key {key!r}: {item!r}")
            index = next((i for i, old in enumerate(merged) if old.get(key) == item[key]), None)
            if item.get("$patch") == "delete":
                if index is not None:
                    del merged[index]
            elif index is None:
                merged.append(strip_directives(item))
            else:
                merged[index] = strategic_merge(merged[index], item, field)
        return merged
    return strip_directives(patch)


def strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_directives(v) for k, v in value.items() if not k.startswith("$") and v is not None}
    if isinstance(value, list):
        return [strip_directives(v) for v in value]
    return value


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """`name[:tag][@digest]` -> (name, tag, digest); a registry port is not a tag."""
    name, _, digest = image.partition("@")
    tag = None
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest or None


def pod_containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec") or spec.get("jobTemplate", {}).get("spec", {}).get(
        "template", {}).get("spec") or (spec if obj.get("kind") == "Pod" else {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def set_images(objects: list[dict], images: list[dict]) -> None:
    for rule in images:
        for obj in objects:
            for container in pod_containers(obj):
                name, tag, digest = split_image(container["image"])
                if name != rule["name"]:
                    continue
                name = rule.get("newName", name)
                if "digest" in rule:
                    container["image"] = f"{name}@{rule['digest']}"
                elif "newTag" in rule:
                    container["image"] = f"{name}:{rule['newTag']}"
                else:
                    container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def build(directory: Path) -> list[dict]:
    """The resources `kustomize build directory` would print, in order."""
    directory = Path(directory)
    kustomization = read_kustomization(directory)
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects.extend(build(path))
        elif path.is_file():
            objects.extend(load_documents(path))
        else:
            raise KustomizeError(f"{directory}: resource {entry} does not exist")
    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise KustomizeError(f"{directory}: only `path` patches are implemented, not {patch_entry}")
        for patch in load_documents(directory / patch_entry["path"]):
            kind, name = patch.get("kind"), patch.get("metadata", {}).get("name")
            matches = [i for i, obj in enumerate(objects)
                       if obj.get("kind") == kind and obj.get("metadata", {}).get("name") == name]
            if len(matches) != 1:
                raise KustomizeError(f"{directory}: patch {patch_entry['path']} targets {kind}/{name}, "
                                     f"which matches {len(matches)} resources")
            objects[matches[0]] = strategic_merge(objects[matches[0]], patch)
    set_images(objects, kustomization.get("images", []))
    return objects
