"""COCO instances files and JSONL image paths, shared by the fine-tuning set writer and the evaluation.

One reader for both tools: segmentations (polygons, compressed or uncompressed RLE) decode to bool
masks with a clear reason when malformed; a bad annotation is reported by id and skipped, never
failing its image's other objects. Masks are decoded one image at a time (a COCO file's masks
together would not fit in memory).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..model.targets import pycocotools_rle, segmentation_mask  # noqa: F401 (this module's public names)


@dataclass(frozen=True)
class Annotation:
    """One usable COCO object: its id, category, full-size bool `[H, W]` mask and expressions."""

    id: int
    label: str
    category_id: int
    mask: np.ndarray
    sentences: tuple[str, ...] = ()
    iscrowd: bool = False


@dataclass
class Report:
    """What a conversion did: lines and objects written, and what it skipped (with ids and reasons)."""

    lines: int = 0
    objects: int = 0
    crowd: int = 0
    over_limit: int = 0
    errors: list[dict] = field(default_factory=list)

    def skip(self, annotation_id, reason: str) -> None:
        self.errors.append({"annotation_id": annotation_id, "reason": reason})

    def summary(self) -> str:
        return (f"{self.lines} lines, {self.objects} objects; skipped {len(self.errors)} bad annotations, "
                f"{self.crowd} crowd regions, {self.over_limit} objects over --max-objects")


def _sentences(annotation: dict) -> tuple[str, ...]:
    found = annotation.get("sentences") or ([annotation["caption"]] if annotation.get("caption") else [])
    return tuple(s["sent"] if isinstance(s, dict) else str(s) for s in found)


class CocoAnnotations:
    """A COCO instances file (`{"images", "categories", "annotations"}`) indexed by image."""

    def __init__(self, coco: dict):
        self.images: dict[int, dict] = {image["id"]: image for image in coco.get("images", [])}
        self.categories: dict[int, str] = {c["id"]: c["name"] for c in coco.get("categories", [])}
        self.raw: dict[int, list[dict]] = defaultdict(list)
        self.orphans: list[dict] = []  # annotations of an image the file does not list
        for ann in coco.get("annotations", []):
            image_id = ann.get("image_id")
            (self.raw[image_id] if image_id in self.images else self.orphans).append(ann)

    @classmethod
    def read(cls, path: Path) -> CocoAnnotations:
        """ValueError names the file when it is not readable JSON."""
        try:
            return cls(json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"cannot read the COCO file {path}: {exc}") from exc

    def report_orphans(self, report: Report) -> None:
        for ann in self.orphans:
            report.skip(ann.get("id"), f"unknown image_id {ann.get('image_id')!r}")

    def category_ids(self, image_id: int) -> list[int]:
        """The known categories of the image's non-crowd annotations, sorted by id (masks not decoded)."""
        return sorted({a.get("category_id") for a in self.raw[image_id]
                       if not a.get("iscrowd") and a.get("category_id") in self.categories})

    def annotations(self, image_id: int, report: Report, *, keep_crowd: bool = False) -> list[Annotation]:
        """The image's usable objects, masks decoded at the size its record states; bad annotations
        go to `report` with their reason, crowd regions are counted there unless `keep_crowd`."""
        image = self.images[image_id]
        usable = []
        for ann in self.raw[image_id]:
            ann_id = ann.get("id")
            if ann.get("iscrowd") and not keep_crowd:
                report.crowd += 1
                continue
            if ann.get("category_id") not in self.categories:
                report.skip(ann_id, f"unknown category_id {ann.get('category_id')!r}")
                continue
            try:
                mask = segmentation_mask(ann.get("segmentation"), int(image["height"]), int(image["width"]))
            except (ValueError, TypeError, KeyError) as exc:
                report.skip(ann_id, str(exc))
                continue
            if not mask.any():
                report.skip(ann_id, "the segmentation covers no pixel")
                continue
            usable.append(Annotation(ann_id, self.categories[ann["category_id"]], ann["category_id"], mask,
                                     _sentences(ann), bool(ann.get("iscrowd"))))
        return usable


def image_file(images_dir: Path, image: dict) -> Path:
    """Where a COCO image record's `file_name` lies under the image folder."""
    return Path(images_dir) / image["file_name"]


def jsonl_image_path(image: Path, jsonl_dir: Path) -> str:
    """The `"image"` of a JSONL line: the image's path relative to the JSONL file's folder (POSIX
    separators), so the set can be moved with its images."""
    return Path(os.path.relpath(os.path.abspath(image), os.path.abspath(jsonl_dir))).as_posix()


def resolve_jsonl_image(jsonl: Path, image: str) -> Path:
    """The file a JSONL line's `"image"` names: relative paths are relative to the JSONL file's folder."""
    return Path(jsonl).parent / image
