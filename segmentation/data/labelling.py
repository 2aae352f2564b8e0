"""Bulk labelling of a folder of images into COCO (and YOLO segmentation, PNG masks), resumably.

Every finished image is appended at once to `OUT/answers.jsonl` (one JSON line per image: the
server's answer, or the reason it failed), so a run that is killed loses nothing it finished; a new
run with the same OUT skips the images already answered and tries the failed ones again. The output
files are rebuilt from that log at the end of every run:

- `OUT/coco.json`: a COCO instances file; `images[].file_name` is the path relative to the folder,
  `annotations` carry RLE masks and `score`, `categories` are the prompt's classes (ids 1..) followed
  by any other label the model wrote, in file order (none with `labels_from_prompt=True`: the model
  may then only write the prompt's classes, so category ids are fixed by the prompt alone);
- `OUT/failures.json`: the images that failed, with the reason; files that are not images of an
  accepted format are listed as skipped;
- optionally `OUT/yolo/<path>.txt` (YOLO segmentation, classes in `OUT/yolo/classes.txt`) and
  `OUT/masks/<path>.png` (8-bit instance map: pixel = 1 + the object's index, 0 = background).

Against a server (`AsyncRemoteSegmenter`) up to `concurrency` requests are in flight, enough to keep
the server's batches full (its default batch is 16). Locally (`Segmenter`) images go in batches.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
from PIL import Image

from ..model.conversions import category_ids, prompt_classes
from ..model.results import SegmentationResult

ANSWERS_FILE = "answers.jsonl"
COCO_FILE = "coco.json"
FAILURES_FILE = "failures.json"
# The formats the server decodes (segmentation.model.images.ACCEPTED_FORMATS), by file suffix.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
DEFAULT_CONCURRENCY = 32
DEFAULT_BATCH_SIZE = 8


@dataclass
class Folder:
    """The files under a folder: images to label and other files skipped (paths relative, sorted)."""

    root: Path
    images: list[str]
    skipped: list[str]


def scan_folder(root: Path, exclude: Path | None = None) -> Folder:
    """Every file under `root` (recursively, hidden ones left out), split by suffix; `exclude` (the
    output folder, when it lies inside `root`) is not scanned."""
    images, skipped = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if exclude is not None and path.is_relative_to(exclude):
            continue
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        (images if path.suffix.lower() in IMAGE_SUFFIXES else skipped).append(relative.as_posix())
    return Folder(root, images, skipped)


@dataclass
class AnswerLog:
    """The append-only log `OUT/answers.jsonl`: `{"file", "answer"}` or `{"file", "error", "status"}`
    per line. `answers` holds the last answer per file; `failures` the files whose last line failed."""

    path: Path
    answers: dict[str, dict] = field(default_factory=dict)
    failures: dict[str, dict] = field(default_factory=dict)
    _out: TextIO | None = None

    @classmethod
    def open(cls, path: Path) -> AnswerLog:
        """Read what earlier runs finished. A torn last line (a run killed mid-write) is ignored."""
        log = cls(path)
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            log._remember(record)
        log._out = path.open("a", encoding="utf-8")
        if text and not text.endswith("\n"):
            log._out.write("\n")  # after a torn line, start a fresh one
        return log

    def _remember(self, record: dict) -> None:
        name = record["file"]
        if "answer" in record:
            self.answers[name] = record["answer"]
            self.failures.pop(name, None)
        elif name not in self.answers:
            self.failures[name] = {"file": name, "error": record["error"], "status": record.get("status")}

    def append(self, record: dict) -> None:
        """Write one finished image now (flushed to the OS: a process killed after this keeps it)."""
        self._out.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._out.flush()
        self._remember(record)

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


@dataclass
class Summary:
    """What a run did: images answered now and before, failures, skipped files, objects, speed."""

    labelled: int
    resumed: int
    failed: list[dict]
    skipped: list[str]
    objects: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.labelled / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        text = [
            f"labelled {self.labelled} images in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s); "
            f"{self.resumed} done by earlier runs; {self.objects} objects in all",
            f"{len(self.failed)} failed, {len(self.skipped)} skipped (not an accepted image format)",
        ]
        text += [f"  failed: {f['file']}: {f['error']}" for f in self.failed]
        text += [f"  skipped: {name}" for name in self.skipped]
        return text


def error_record(name: str, exc: Exception) -> dict:
    return {"file": name, "error": getattr(exc, "message", None) or str(exc), "status": getattr(exc, "status", None)}


async def label_remote(
    folder: Folder,
    names: list[str],
    prompt: str,
    segmenter,
    log: AnswerLog,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    labels_from_prompt: bool = False,
    on_done: Callable[[], None] = lambda: None,
) -> None:
    """Send `names` through an `AsyncRemoteSegmenter`, `concurrency` at a time, logging each answer."""
    from ..client import RemoteError

    queue: asyncio.Queue[str] = asyncio.Queue()
    for name in names:
        queue.put_nowait(name)

    async def worker() -> None:
        while not queue.empty():
            name = queue.get_nowait()
            try:
                data = await asyncio.to_thread((folder.root / name).read_bytes)
                record = {"file": name, "answer": await segmenter.answer(
                    data, prompt, labels_from_prompt=labels_from_prompt)}
            except (RemoteError, OSError) as exc:
                record = error_record(name, exc)
            log.append(record)
            on_done()

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(names))))))


def label_local(
    folder: Folder,
    names: list[str],
    prompt: str,
    segmenter,
    log: AnswerLog,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    labels_from_prompt: bool = False,
    on_done: Callable[[], None] = lambda: None,
) -> None:
    """Run `names` through a local `Segmenter` in batches, decoding files as the server does."""
    from ..model.bodies import response_body
    from ..model.images import ImageError, open_image

    for start in range(0, len(names), batch_size):
        batch = []
        for name in names[start:start + batch_size]:
            try:
                batch.append((name, open_image((folder.root / name).read_bytes())))
            except (ImageError, OSError) as exc:
                log.append(error_record(name, exc))
                on_done()
        if not batch:
            continue
        results = segmenter.segment([image for _, image in batch], prompt, labels_from_prompt=labels_from_prompt)
        for (name, _), result in zip(batch, results):
            log.append({"file": name, "answer": response_body(result, model="local", mask_format="rle")})
            on_done()


def results_in_order(log: AnswerLog) -> list[tuple[str, SegmentationResult]]:
    """Every answered image, sorted by path, as library results (masks decoded)."""
    from ..client import parse_answer

    return [(name, parse_answer(log.answers[name])) for name in sorted(log.answers)]


def coco_dataset(results: Iterable[tuple[str, SegmentationResult]], prompt: str) -> dict:
    """A COCO instances dict: images by path (ids 1..), annotations numbered 1.., and categories: the
    prompt's classes, then other labels in file order."""
    from ..model.conversions import to_coco

    categories = {name: i + 1 for i, name in enumerate(prompt_classes(prompt))}
    images, annotations = [], []
    for image_id, (name, result) in enumerate(results, start=1):
        images.append({"id": image_id, "file_name": name, "width": result.width, "height": result.height})
        categories = category_ids(result, categories)
        annotations += to_coco(result, image_id, categories=categories, first_id=len(annotations) + 1)
    return {
        "info": {"description": f"labelled by PaliGemma 2 segmentation, prompt {prompt!r}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for name, i in categories.items()],
    }


def instance_map(result: SegmentationResult) -> np.ndarray:
    """uint8 [H, W]: 1 + the index of the object covering each pixel (later objects on top), 0 elsewhere."""
    labels = np.zeros((result.height, result.width), dtype=np.uint8)
    for index, obj in enumerate(result.objects[:255]):
        if obj.mask is not None:
            labels[obj.mask] = index + 1
    return labels


def write_outputs(out: Path, log: AnswerLog, prompt: str, *, yolo: bool = False, png_masks: bool = False) -> dict:
    """(Re)build coco.json and the optional YOLO and PNG files from the log; returns the COCO dict."""
    results = results_in_order(log)
    coco = coco_dataset(results, prompt)
    write_json(out / COCO_FILE, coco)
    classes = tuple(c["name"] for c in coco["categories"])
    if yolo:
        from ..model.conversions import to_yolo_lines

        (out / "yolo").mkdir(exist_ok=True)
        (out / "yolo" / "classes.txt").write_text("".join(f"{name}\n" for name in classes), encoding="utf-8")
        for name, result in results:
            target = (out / "yolo" / name).with_suffix(".txt")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(f"{line}\n" for line in to_yolo_lines(result, classes)), encoding="utf-8")
    if png_masks:
        for name, result in results:
            target = (out / "masks" / name).with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(instance_map(result), mode="L").save(target)
    return coco


def write_json(path: Path, data) -> None:
    """Write through a temporary file, so a reader (or a kill) never sees half a file."""
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(data), encoding="utf-8")
    partial.replace(path)


def label_folder(
    root: Path,
    out: Path,
    prompt: str,
    segmenter,
    *,
    remote: bool,
    concurrency: int = DEFAULT_CONCURRENCY,
    batch_size: int = DEFAULT_BATCH_SIZE,
    yolo: bool = False,
    png_masks: bool = False,
    labels_from_prompt: bool = False,
    progress: bool = True,
) -> Summary:
    """Label every image under `root` not yet answered in `out`, then rebuild the outputs.
    `labels_from_prompt`: every label is one of the prompt's classes (as `Segmenter.segment`). It
    applies to the images this run answers; answers logged by earlier runs are kept as they are."""
    from tqdm import tqdm

    prompt_classes(prompt)  # a bad prompt (PromptError) stops the run before any work
    out.mkdir(parents=True, exist_ok=True)
    folder = scan_folder(root, exclude=out.resolve() if out.resolve().is_relative_to(root.resolve()) else None)
    log = AnswerLog.open(out / ANSWERS_FILE)
    todo = [name for name in folder.images if name not in log.answers]
    resumed = len(folder.images) - len(todo)
    bar = tqdm(total=len(folder.images), initial=resumed, unit="img", disable=not progress, desc="labelling")
    start = time.perf_counter()
    try:
        if remote:
            asyncio.run(label_remote(folder, todo, prompt, segmenter, log, concurrency=concurrency,
                                     labels_from_prompt=labels_from_prompt, on_done=lambda: bar.update(1)))
        else:
            label_local(folder, todo, prompt, segmenter, log, batch_size=batch_size,
                        labels_from_prompt=labels_from_prompt, on_done=lambda: bar.update(1))
    finally:
        bar.close()
        log.close()
        seconds = time.perf_counter() - start
        # Also after Ctrl-C: the files then hold everything finished so far.
        coco = write_outputs(out, log, prompt, yolo=yolo, png_masks=png_masks)
        failed = [log.failures[name] for name in sorted(log.failures) if name in folder.images]
        write_json(out / FAILURES_FILE, {"failed": failed, "skipped": folder.skipped})
    labelled = sum(1 for name in todo if name in log.answers)
    return Summary(labelled, resumed, failed, folder.skipped, len(coco["annotations"]), seconds)
