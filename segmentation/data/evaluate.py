"""Evaluate a model on a JSONL or COCO set, through the library or a running server.

    python -m segmentation.data.evaluate --jsonl set.jsonl --model-dir DIR --vae vae-oid.npz --out run.jsonl
    python -m segmentation.data.evaluate --coco instances.json --images DIR --url http://127.0.0.1:3000 \\
        --out run.jsonl

Sets:

- JSONL, one example a line: `{"image": path relative to the file, "prefix": "segment cat ; dog",
  "suffix": "<loc…>×4 <seg…>×16 cat ; …"}`, with an optional `"masks"`: one COCO RLE
  (`{"size": [h, w], "counts": str}`) per object of the suffix, in its order. Ground-truth boxes
  (normalized (y1, x1, y2, x2), big_vision's order: `bin / 1023` of the `<loc>` tokens) and labels
  come from the suffix; masks from `"masks"` when present, else the suffix's
  codes decoded by the VQ-VAE (`--vae`) and pasted into the box, as the service pastes answers.
- COCO: an instances annotation file and its image folder. Each image with objects is one example;
  its prompt names the categories annotated in it (by category id, at most 32), so the set measures
  masks and labels, not rejection of absent classes. Crowd regions are ignored by COCO AP. The file
  is read by `segmentation.data.coco`, as the fine-tuning set writer reads it: a bad annotation is
  logged and left out; ground-truth boxes are the masks' tight boxes.

Reported (`--metrics`, JSON, and a table on screen): big_vision's `miou`, `boxacc@0.5`,
`boxacc@0.75`, `invalid`, `total` (the first object of each answer against the example's first
ground-truth object), `ciou`, and COCO mask AP (`coco/AP`, `coco/AP50`, …; pycocotools COCOeval on
every answered object whose label is one of the set's classes, with the model's scores). For class
prompts use `--labels-from-prompt` so every label is a requested class.

Resumable: each finished example is appended to the `--out` JSONL as it completes; a rerun skips the
examples already there (failed ones are tried again) and the metrics are computed from that file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..model.encoding import mask_to_rle, rle_to_mask
from ..model.images import open_image
from ..model.masks import paste_mask
from ..model.prompts import MAX_CLASSES, TASKS, parse_prompt
from ..model.results import SegmentationResult
from ..model.tokens import box_to_pixels, is_valid_box, parse_objects
from .coco import CocoAnnotations, Report, image_file, pycocotools_rle, resolve_jsonl_image
from .evaluation import (
    ReferringScore,
    box_of_locs,
    coco_mask_ap,
    first_object,
    score_referring,
    summarize_referring,
)
from .targets import Box, tight_box

logger = logging.getLogger(__name__)


class SegmenterLike(Protocol):
    """`segmentation.Segmenter` or `segmentation.client.RemoteSegmenter`."""

    def segment(self, images: list[Image.Image], prompts: list[str], **options) -> list[SegmentationResult]: ...


@dataclass
class GroundTruthObject:
    label: str
    mask: np.ndarray  # bool [H, W] at the original image size
    box: Box  # normalized (y1, x1, y2, x2)
    iscrowd: bool = False


@dataclass
class Example:
    """One image and prompt; `load_objects(width, height)` gives its ground truth."""

    key: str
    image_id: int
    image_path: Path
    prompt: str
    load_objects: Callable[[int, int], list[GroundTruthObject]]


class EvaluationSet:
    """Examples, the category id of each class name, and how to build COCO's ground truth."""

    def __init__(self, examples: list[Example], categories: dict[str, int]):
        self.examples = examples
        self.categories = categories

    def coco_ground_truth(self, outcomes: list[dict]):
        """A `pycocotools.coco.COCO` holding the ground truth the outcomes recorded."""
        from pycocotools import mask as coco_mask
        from pycocotools.coco import COCO

        images, annotations = [], []
        for outcome in outcomes:
            images.append({"id": outcome["image_id"], "width": outcome["width"], "height": outcome["height"]})
            for obj in outcome["ground_truth"]:
                rle = pycocotools_rle(obj["mask"])
                annotations.append({
                    "id": len(annotations) + 1, "image_id": outcome["image_id"],
                    "category_id": self.categories[obj["label"]], "segmentation": obj["mask"],
                    "area": float(coco_mask.area(rle)), "bbox": coco_mask.toBbox(rle).tolist(),
                    "iscrowd": int(obj["iscrowd"]),
                })
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name} for name, i in self.categories.items()],
        }
        with contextlib.redirect_stdout(io.StringIO()):
            ground_truth.createIndex()
        return ground_truth


def load_jsonl_set(path: Path, decoder=None) -> EvaluationSet:
    """A JSONL set (see the module docstring); `decoder` (a `MaskDecoder`) is needed only for lines
    without `"masks"`."""
    examples, categories = [], {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, prefix, suffix = record["image"], record["prefix"], record["suffix"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a JSON object with image, prefix and suffix ({exc})") from exc
        task = prefix.split(maxsplit=1)[0].lower() if prefix.strip() else ""
        prompt = parse_prompt(prefix, task if task in TASKS else "segment")
        for name in prompt.classes:
            categories.setdefault(name, len(categories) + 1)
        where = f"{path}:{number}"
        examples.append(Example(
            key=str(number), image_id=number, image_path=resolve_jsonl_image(path, image), prompt=prompt.text,
            load_objects=functools.partial(suffix_objects, suffix, record.get("masks"), decoder=decoder,
                                           where=where, classes=prompt.classes),
        ))
        for obj in parse_objects(suffix):
            categories.setdefault(object_label(obj.label, prompt.classes), len(categories) + 1)
    return EvaluationSet(examples, categories)


def object_label(label: str, classes: tuple[str, ...]) -> str:
    """A suffix object's label; a label-less object (referring-expression sets write none) of a
    one-phrase prompt is that phrase."""
    return classes[0] if not label and len(classes) == 1 else label


def suffix_objects(suffix: str, masks: list[dict] | None, width: int, height: int, decoder, where: str,
                   classes: tuple[str, ...] = ()):
    """Ground truth from a training suffix: boxes and labels from its tokens, masks from `masks`
    (COCO RLE per object) or from its codes."""
    objects = parse_objects(suffix)
    if not objects:
        raise ValueError(f"{where}: the suffix holds no object")
    if masks is not None:
        if len(masks) != len(objects):
            raise ValueError(f"{where}: {len(masks)} masks for {len(objects)} objects in the suffix")
        full = [rle_to_mask(m) for m in masks]
        if any(m.shape != (height, width) for m in full):
            raise ValueError(f"{where}: a mask's size is not the image's {height}x{width} (height, width)")
    else:
        if decoder is None or any(o.codes is None for o in objects):
            raise ValueError(f"{where}: no 'masks' field, and the suffix's codes need the VAE (--vae) to decode")
        maps = decoder.decode(np.array([o.codes for o in objects], dtype=np.int32))
        full = [paste_mask(m, box_to_pixels(o.locs, width, height), width, height) for o, m in zip(objects, maps)]
    return [GroundTruthObject(object_label(o.label, classes), m, box_of_locs(o.locs)) for o, m in zip(objects, full)]


class CocoSet(EvaluationSet):
    """A COCO instances file, read as the fine-tuning set writer reads it (`segmentation.data.coco`):
    a bad annotation is logged with its id and reason and left out of the ground truth."""

    def __init__(self, annotation_file: Path, image_dir: Path):
        self.coco = CocoAnnotations.read(annotation_file)
        names = self.coco.categories
        examples = []
        for image_id in sorted(self.coco.images):
            present = self.coco.category_ids(image_id)[:MAX_CLASSES]
            if not present:
                continue
            examples.append(Example(
                key=str(image_id), image_id=image_id, image_path=image_file(image_dir, self.coco.images[image_id]),
                prompt="segment " + " ; ".join(names[c] for c in present),
                load_objects=functools.partial(self._objects, image_id, tuple(present)),
            ))
        super().__init__(examples, {name: i for i, name in names.items()})

    def _objects(self, image_id, categories, width, height) -> list[GroundTruthObject]:
        """The image's objects of the prompt's categories, in prompt order (the first is scored by
        big_vision's rules), crowd regions last."""
        record = self.coco.images[image_id]
        if (int(record["width"]), int(record["height"])) != (width, height):
            raise ValueError(f"image {image_id}: annotated as {record['width']}x{record['height']}, "
                             f"the file is {width}x{height}")
        report = Report()
        annotations = [a for a in self.coco.annotations(image_id, report, keep_crowd=True)
                       if a.category_id in categories]
        for error in report.errors:
            logger.warning("image %s: annotation %s left out: %s", image_id, error["annotation_id"], error["reason"])
        annotations.sort(key=lambda a: (a.iscrowd, categories.index(a.category_id), a.id))
        if not any(not a.iscrowd for a in annotations):
            raise ValueError(f"image {image_id}: no usable annotation of {categories}")
        return [GroundTruthObject(a.label, a.mask, tight_box(a.mask), a.iscrowd) for a in annotations]


def referring_score_of(result: SegmentationResult, objects: list[GroundTruthObject]) -> ReferringScore:
    """big_vision's score of an answer: its first object (by the raw text) against the first
    non-crowd ground-truth object. The mask is the answer's own pasted mask of that object."""
    target = next(o for o in objects if not o.iscrowd)
    first = first_object(result.text)
    if first is None:
        return score_referring(None, None, target.mask, target.box)
    box = box_to_pixels(first.locs, result.width, result.height)
    mask = None
    if is_valid_box(box):
        # The answer keeps every object with a non-empty pixel box, in order: this one is its first.
        answered = result.objects[0]
        if tuple(answered.box) != box or answered.mask is None:
            raise ValueError(f"the answer's first object {answered.box} does not match its text's {box}")
        mask = answered.mask
    return score_referring(box_of_locs(first.locs), mask, target.mask, target.box)


def outcome_record(example: Example, result: SegmentationResult, objects: list[GroundTruthObject],
                   categories: dict[str, int]) -> dict:
    """The line the outcome file keeps for one answered example."""
    score = referring_score_of(result, objects)
    return {
        "key": example.key, "image_id": example.image_id, "prompt": example.prompt,
        "width": result.width, "height": result.height, "text": result.text,
        "referring": asdict(score),
        "detections": [
            {"label": o.label, "category_id": categories.get(o.label), "score": o.score,
             "segmentation": mask_to_rle(o.mask)}
            for o in result.objects if o.mask is not None
        ],
        "ground_truth": [{"label": o.label, "iscrowd": o.iscrowd, "mask": mask_to_rle(o.mask)} for o in objects],
    }


def read_outcomes(path: Path) -> dict[str, dict]:
    """Finished examples by key; a line cut short by an interrupted run is ignored."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "key" in record and "error" not in record:
                done[record["key"]] = record
    return done


def _end_last_line(path: Path) -> None:
    """End a line an interrupted run cut short, so the next record starts a line of its own."""
    if not path.exists() or not path.stat().st_size:
        return
    with path.open("rb+") as f:
        f.seek(-1, io.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run(
    dataset: EvaluationSet,
    segmenter: SegmenterLike,
    out: Path,
    *,
    batch_size: int = 8,
    labels_from_prompt: bool = False,
    progress: bool = True,
) -> dict:
    """Answer every example not yet in `out` (appending as they finish); return this run's counts."""
    # Passed only when asked for: both Segmenter and RemoteSegmenter take it, and the client then sends
    # the field only when true, so a server older than the option still answers plain runs.
    options = {"labels_from_prompt": True} if labels_from_prompt else {}
    done = read_outcomes(out)
    todo = [e for e in dataset.examples if e.key not in done]
    answered = failed = 0
    start = time.perf_counter()
    bar = tqdm(total=len(dataset.examples), initial=len(dataset.examples) - len(todo), unit="image",
               disable=not progress, file=sys.stderr)
    _end_last_line(out)
    with out.open("a") as sink, bar:
        for batch in _batches(todo, batch_size):
            for record in _answer(dataset, segmenter, batch, options):
                sink.write(json.dumps(record) + "\n")
                failed += "error" in record
                answered += "error" not in record
            sink.flush()
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    return {"answered": answered, "failed": failed, "seconds": round(seconds, 3),
            "images_per_second": round(answered / seconds, 3) if answered and seconds > 0 else None}


def _answer(dataset: EvaluationSet, segmenter: SegmenterLike, batch: list[Example], options: dict) -> list[dict]:
    """Outcome records of a batch; a failing batch is retried one example at a time, so one bad
    example fails alone (its record holds `error` and is retried by the next run)."""
    try:
        images = [open_image(e.image_path.read_bytes()) for e in batch]
        results = segmenter.segment(images, [e.prompt for e in batch], **options)
        return [outcome_record(e, r, e.load_objects(r.width, r.height), dataset.categories)
                for e, r in zip(batch, results)]
    except Exception as exc:
        if len(batch) == 1:
            logger.warning("example %s failed: %s", batch[0].key, exc)
            return [{"key": batch[0].key, "error": f"{type(exc).__name__}: {exc}"}]
        return [record for example in batch for record in _answer(dataset, segmenter, [example], options)]


def metrics(dataset: EvaluationSet, out: Path) -> dict:
    """All metrics from the outcome file, over this set's examples found in it."""
    done = read_outcomes(out)
    outcomes = [done[e.key] for e in dataset.examples if e.key in done]
    summary = summarize_referring([ReferringScore(**o["referring"]) for o in outcomes])
    detections = [
        {"image_id": o["image_id"], "category_id": d["category_id"], "segmentation": d["segmentation"],
         "score": d["score"]}
        for o in outcomes for d in o["detections"] if d["category_id"] is not None
    ]
    if outcomes:
        ap = coco_mask_ap(dataset.coco_ground_truth(outcomes), detections, [o["image_id"] for o in outcomes])
        summary.update({f"coco/{name}": value for name, value in ap.items()})
    summary["unmatched_labels"] = sum(d["category_id"] is None for o in outcomes for d in o["detections"])
    summary["missing"] = len(dataset.examples) - len(outcomes)
    return summary


def table(values: dict) -> str:
    """The metrics as two aligned columns."""
    width = max(map(len, values))
    def shown(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    return "\n".join(f"{name:<{width}}  {shown(value)}" for name, value in values.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m segmentation.data.evaluate", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--jsonl", type=Path, help="a JSONL set (image paths relative to the file)")
    source.add_argument("--coco", type=Path, help="a COCO instances annotation file (with --images)")
    parser.add_argument("--images", type=Path, help="the image folder of --coco")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model-dir", type=Path, help="a PaliGemma directory (library mode; needs --vae)")
    model.add_argument("--url", help="a running server, e.g. http://127.0.0.1:3000")
    parser.add_argument("--vae", type=Path, help="vae-oid.npz: the mask decoder (library mode; JSONL without masks)")
    parser.add_argument("--api-key", help="the server's API key (or set SEG_API_KEY)")
    parser.add_argument("--model", help="which served model (server mode; default: the server's default)")
    parser.add_argument("--out", type=Path, required=True, help="outcome JSONL, appended to and resumed from")
    parser.add_argument("--metrics", type=Path, help="metrics JSON (default: OUT with .metrics.json)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model call or concurrent requests")
    parser.add_argument("--limit", type=int, help="only the first N examples")
    parser.add_argument("--labels-from-prompt", action="store_true",
                        help="labels may only be the prompt's classes (recommended for COCO AP)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _segmenter(args, decoder):
    """The library's Segmenter or the remote client, as the arguments ask."""
    if args.url:
        import os

        from ..client import RemoteSegmenter

        return RemoteSegmenter(args.url, api_key=args.api_key or os.environ.get("SEG_API_KEY"), model=args.model,
                               concurrency=args.batch_size)
    from ..model.engine import PaliGemmaEngine
    from ..model.segmenter import Segmenter

    return Segmenter(PaliGemmaEngine.from_pretrained(args.model_dir), decoder)


def main(argv: Iterable[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.coco and not args.images:
        raise SystemExit("--coco needs --images (the folder of the annotation file's images)")
    if args.model_dir and not args.vae:
        raise SystemExit("--model-dir needs --vae (the mask decoder vae-oid.npz)")
    decoder = None
    if args.vae:
        from ..model.vae import MaskDecoder

        decoder = MaskDecoder.from_npz(args.vae)
    try:
        dataset = CocoSet(args.coco, args.images) if args.coco else load_jsonl_set(args.jsonl, decoder)
    except (OSError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    if args.limit is not None:
        dataset.examples = dataset.examples[: args.limit]
    segmenter = _segmenter(args, decoder)
    try:
        counts = run(dataset, segmenter, args.out, batch_size=args.batch_size,
                     labels_from_prompt=args.labels_from_prompt, progress=not args.no_progress)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    finally:
        getattr(segmenter, "close", lambda: None)()
    summary = {**metrics(dataset, args.out), "run": counts}
    metrics_path = args.metrics or args.out.with_suffix(".metrics.json")
    metrics_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(table({k: v for k, v in summary.items() if k != "run"}))
    print(f"this run: {counts['answered']} answered, {counts['failed']} failed in {counts['seconds']} s "
          f"({counts['images_per_second']} images/s); metrics in {metrics_path}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
