"""COCO-format masks → a PaliGemma fine-tuning set: JSONL lines `{"image", "prefix", "suffix"}`.

    python -m segmentation.data.finetune_set --annotations instances.json --images DIR \\
        --vae vae-oid.npz --out train.jsonl [--classes-per-line 4] [--max-objects 8] [--order position]
    python -m segmentation.data.finetune_set --refexp ...   # one expression, one mask per line

The layout is the one Hugging Face's and big_vision's PaliGemma fine-tuning recipes read: `image`
(the image path: `--images` joined with the file name), `prefix` (the prompt, `segment cat ; dog`),
`suffix` (the target text, `<loc…>×4<seg…>×16 cat ; <loc…>… dog`, see `segmentation.data.targets`).

Class mode (default): per image, its classes (the category names of its usable objects) sorted by
name; at most `--classes-per-line` classes per line (an image with more gives several lines); in the
suffix the objects come grouped by class in prefix order and, within a class, in `--order`:
`position` (top to bottom, then left to right, by the box's y1, x1), `area` (largest first) or `id`
(annotation id); ties go to the lower annotation id, so the output is stable. At most `--max-objects`
objects per class are kept, the first ones in that order (the others are counted in the summary).

Referring-expression mode (`--refexp`): each annotation with expressions (a `sentences` list of
strings or of `{"sent": ...}`, or a `caption` string, as RefCOCO's refs joined to its instances) gives
one line per expression: prefix `segment <expression>`, suffix the object's `<loc>`/`<seg>` text with
no label, as big_vision's `refcoco_mask2str`.

Annotations are polygons or RLE (compressed or not). A bad one (unknown image or category, a missing
image file, no or malformed segmentation, an empty mask) is reported on stderr with its id and the reason and skipped;
crowd regions (`iscrowd: 1`) are skipped and counted. `--errors FILE` writes the reports as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask
from tqdm import tqdm

from .targets import ObjectMask, TargetError, encode_objects, tight_box

ORDERS = ("position", "area", "id")


@dataclass(frozen=True)
class Annotation:
    """One usable COCO object: its id, class name, full-size bool mask and expressions."""

    id: int
    label: str
    mask: np.ndarray
    sentences: tuple[str, ...] = ()


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


def segmentation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO `segmentation` (polygon list, uncompressed RLE with a counts list, or compressed RLE
    with a counts string) as a bool `[height, width]` mask. ValueError says what is malformed."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list)]
        if not polygons or len(polygons) != len(segmentation):
            raise ValueError("polygon segmentation must be a non-empty list of [x0, y0, x1, y1, ...] lists")
        for polygon in polygons:
            if len(polygon) < 6 or len(polygon) % 2 or not all(isinstance(v, int | float) for v in polygon):
                raise ValueError("each polygon needs at least 3 points as an even count of numbers")
        rles = coco_mask.frPyObjects(polygons, height, width)
        return coco_mask.decode(coco_mask.merge(rles)).astype(bool)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(v) for v in segmentation["size"]] != [height, width]:
            raise ValueError(f"RLE size {segmentation['size']} differs from the image's [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
                raise ValueError("uncompressed RLE counts must be non-negative integers")
            if sum(counts) != height * width:
                raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, not {height}x{width}")
            rle = coco_mask.frPyObjects(segmentation, height, width)
        elif isinstance(counts, str):
            rle = {"size": [height, width], "counts": counts.encode("ascii")}
        else:
            raise ValueError("RLE counts must be a list of run lengths or a compressed string")
        try:
            return coco_mask.decode(rle).astype(bool)
        except Exception as exc:  # pycocotools raises bare exceptions on corrupt strings
            raise ValueError(f"unreadable RLE ({exc})") from exc
    raise ValueError("segmentation must be a polygon list or an RLE {'size', 'counts'}")


def _sentences(annotation: dict) -> tuple[str, ...]:
    found = annotation.get("sentences") or ([annotation["caption"]] if annotation.get("caption") else [])
    return tuple(s["sent"] if isinstance(s, dict) else str(s) for s in found)


def load_annotations(coco: dict, report: Report) -> dict[int, tuple[dict, list[Annotation]]]:
    """Image id → (image record, its usable annotations); bad and crowd ones go to `report`."""
    images = {image["id"]: image for image in coco.get("images", [])}
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    per_image: dict[int, tuple[dict, list[Annotation]]] = {i: (image, []) for i, image in images.items()}
    for ann in coco.get("annotations", []):
        ann_id = ann.get("id")
        if ann.get("iscrowd"):
            report.crowd += 1
            continue
        image = images.get(ann.get("image_id"))
        if image is None:
            report.skip(ann_id, f"unknown image_id {ann.get('image_id')!r}")
            continue
        if ann.get("category_id") not in names:
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
        label = names[ann["category_id"]]
        per_image[image["id"]][1].append(Annotation(ann_id, label, mask, _sentences(ann)))
    return per_image


def sort_key(order: str):
    """The within-class order of objects (ties: the lower annotation id)."""
    if order == "position":
        return lambda a: (*tight_box(a.mask)[:2], a.id)
    if order == "area":
        return lambda a: (-int(a.mask.sum()), a.id)
    return lambda a: a.id


def class_lines(annotations: list[Annotation], classes_per_line: int, max_objects: int, order: str,
                report: Report) -> Iterator[tuple[list[str], list[Annotation]]]:
    """(classes, objects in suffix order) for each line of one image."""
    by_class: dict[str, list[Annotation]] = defaultdict(list)
    for ann in annotations:
        by_class[ann.label].append(ann)
    classes = sorted(by_class)
    for start in range(0, len(classes), classes_per_line):
        chunk = classes[start:start + classes_per_line]
        objects = []
        for name in chunk:
            ranked = sorted(by_class[name], key=sort_key(order))
            report.over_limit += max(0, len(ranked) - max_objects)
            objects += ranked[:max_objects]
        yield chunk, objects


def convert(coco: dict, images_dir: Path, encoder, *, classes_per_line: int = 4, max_objects: int = 8,
            order: str = "position", refexp: bool = False, progress: bool = True) -> tuple[list[dict], Report]:
    """The JSONL records of a COCO dataset (see the module docstring) and the report of the run."""
    report = Report()
    records = []
    per_image = load_annotations(coco, report)
    for image, image_annotations in tqdm(per_image.values(), desc="images", unit="img", disable=not progress):
        path = str(images_dir / image["file_name"])
        if image_annotations and not Path(path).is_file():
            for ann in image_annotations:
                report.skip(ann.id, f"image file {path} not found")
            continue
        if refexp:
            usable = [a for a in image_annotations if a.sentences]
            texts = _encode(encoder, usable, [""] * len(usable), report)
            for ann, text in zip(usable, texts):
                for sentence in ([] if text is None else ann.sentences):
                    records.append({"image": path, "prefix": f"segment {sentence}", "suffix": text})
                    report.objects += 1
            continue
        for classes, objects in class_lines(image_annotations, classes_per_line, max_objects, order, report):
            texts = _encode(encoder, objects, [a.label for a in objects], report)
            kept = [(a.label, t) for a, t in zip(objects, texts) if t is not None]
            # A class whose every object failed leaves the prompt too: naming it with no object would
            # teach the model that it is absent.
            named = [c for c in classes if any(label == c for label, _ in kept)]
            if kept:
                records.append({"image": path, "prefix": "segment " + " ; ".join(named),
                                "suffix": " ; ".join(t for _, t in kept)})
                report.objects += len(kept)
    report.lines = len(records)
    return records, report


def _encode(encoder, annotations: list[Annotation], labels: list[str], report: Report) -> list[str | None]:
    """Each annotation's text as one batch; one bad object is reported and skipped (None), never
    failing the others."""
    objects = [ObjectMask(a.mask, label) for a, label in zip(annotations, labels)]
    try:
        return list(encode_objects(encoder, objects))
    except TargetError:
        texts: list[str | None] = []
        for ann, obj in zip(annotations, objects):
            try:
                texts += encode_objects(encoder, [obj])
            except TargetError as exc:
                report.skip(ann.id, str(exc))
                texts.append(None)
        return texts


def write_jsonl(records: Iterable[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segmentation.data.finetune_set", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=Path, required=True, help="COCO-format JSON (instances_*.json)")
    parser.add_argument("--images", type=Path, required=True, help="the folder holding the images' file_name")
    parser.add_argument("--vae", type=Path, required=True, help="vae-oid.npz (big_vision's mask VQ-VAE)")
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    parser.add_argument("--classes-per-line", type=int, default=4, help="classes in one prompt (default 4)")
    parser.add_argument("--max-objects", type=int, default=8, help="objects kept per class and line (default 8)")
    parser.add_argument("--order", choices=ORDERS, default="position", help="object order within a class")
    parser.add_argument("--refexp", action="store_true", help="one referring expression and one mask per line")
    parser.add_argument("--errors", type=Path, help="write the skipped annotations (id, reason) as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.classes_per_line < 1 or args.max_objects < 1:
        parser.error("--classes-per-line and --max-objects must be at least 1")
    try:
        coco = json.loads(args.annotations.read_text())
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read {args.annotations}: {exc}")

    from ..model.encoder import MaskEncoder

    encoder = MaskEncoder.from_npz(args.vae)
    records, report = convert(coco, args.images, encoder, classes_per_line=args.classes_per_line,
                              max_objects=args.max_objects, order=args.order, refexp=args.refexp,
                              progress=not args.no_progress)
    write_jsonl(records, args.out)
    for error in report.errors:
        print(f"skipped annotation {error['annotation_id']}: {error['reason']}", file=sys.stderr)
    if args.errors:
        args.errors.write_text(json.dumps(report.errors, indent=1))
    print(f"{args.out}: {report.summary()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
