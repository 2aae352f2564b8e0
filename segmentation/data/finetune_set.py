"""COCO-format masks → a PaliGemma fine-tuning set: JSONL lines `{"image", "prefix", "suffix"}`.

    python -m segmentation.data.finetune_set --annotations instances.json --images DIR \\
        --vae vae-oid.npz --out train.jsonl [--classes-per-line 4] [--max-objects 8] [--order position]
    python -m segmentation.data.finetune_set --refexp ...   # one expression, one mask per line

The layout is the one Hugging Face's and big_vision's PaliGemma fine-tuning recipes read: `image`
(the image's path relative to the JSONL file's folder, as `segmentation.data.evaluate` resolves it),
`prefix` (the prompt, `segment cat ; dog`), `suffix` (the target text, `<loc…>×4<seg…>×16 cat ;
<loc…>… dog`, see `segmentation.data.targets`), and `masks`: the exact ground truth, one COCO RLE
`{"size": [h, w], "counts": str}` per suffix object in suffix order, which the evaluation scores
against instead of the 16-code approximation. The masks are on by default: an exact evaluation is
worth a larger file (a 640×480 object's RLE is 200–450 bytes, its suffix text about 170, so lines
grow about threefold), and fine-tuning readers ignore the extra field; `--no-masks` leaves them out.

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
from pathlib import Path

from tqdm import tqdm

from ..model.encoding import mask_to_rle
from .coco import Annotation, CocoAnnotations, Report, image_file, jsonl_image_path
from .targets import ObjectMask, TargetError, encode_objects, tight_box

__all__ = ["ORDERS", "class_lines", "convert", "main", "sort_key", "write_jsonl"]

ORDERS = ("position", "area", "id")


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


def convert(coco: dict, images_dir: Path, encoder, *, jsonl_dir: Path, classes_per_line: int = 4,
            max_objects: int = 8, order: str = "position", refexp: bool = False, masks: bool = True,
            progress: bool = True) -> tuple[list[dict], Report]:
    """The JSONL records of a COCO dataset (see the module docstring) and the report of the run.

    `jsonl_dir`: the folder the JSONL file goes to; each line's `image` is relative to it. `masks`:
    add each line's exact ground truth, one COCO RLE per suffix object in suffix order.
    """
    report = Report()
    records = []
    annotations = CocoAnnotations(coco)
    annotations.report_orphans(report)
    for image_id, image in tqdm(annotations.images.items(), desc="images", unit="img", disable=not progress):
        image_annotations = annotations.annotations(image_id, report)
        path = image_file(images_dir, image)
        if image_annotations and not path.is_file():
            for ann in image_annotations:
                report.skip(ann.id, f"image file {path} not found")
            continue
        if refexp:
            objects = [a for a in image_annotations if a.sentences]
            texts = _encode(encoder, objects, [""] * len(objects), report)
            lines = [([sentence], [(a, text)]) for a, text in zip(objects, texts) for sentence in a.sentences]
        else:
            chunks = list(class_lines(image_annotations, classes_per_line, max_objects, order, report))
            flat = [a for _, objects in chunks for a in objects]
            texts = iter(_encode(encoder, flat, [a.label for a in flat], report))  # the image in one batch
            lines = [(classes, [(a, next(texts)) for a in objects]) for classes, objects in chunks]
        for phrases, objects in lines:
            kept = [(a, text) for a, text in objects if text is not None]
            if not kept:
                continue
            # A class whose every object failed leaves the prompt too: naming it with no object would
            # teach the model that it is absent.
            named = phrases if refexp else [c for c in phrases if any(a.label == c for a, _ in kept)]
            record = {"image": jsonl_image_path(path, jsonl_dir), "prefix": "segment " + " ; ".join(named),
                      "suffix": " ; ".join(text for _, text in kept)}
            if masks:
                record["masks"] = [mask_to_rle(a.mask) for a, _ in kept]
            records.append(record)
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
    parser.add_argument("--no-masks", action="store_true",
                        help="leave out the exact ground-truth masks (COCO RLE per suffix object)")
    parser.add_argument("--errors", type=Path, help="write the skipped annotations (id, reason) as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.classes_per_line < 1 or args.max_objects < 1:
        parser.error("--classes-per-line and --max-objects must be at least 1")
    try:
        coco = json.loads(args.annotations.read_text())
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read {args.annotations}: {exc}")
    if not isinstance(coco, dict):
        parser.error(f"{args.annotations} is not a COCO annotation file (a JSON object with images, annotations)")

    from ..model.encoder import MaskEncoder

    encoder = MaskEncoder.from_npz(args.vae)
    records, report = convert(coco, args.images, encoder, jsonl_dir=args.out.parent,
                              classes_per_line=args.classes_per_line, max_objects=args.max_objects,
                              order=args.order, refexp=args.refexp, masks=not args.no_masks,
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
