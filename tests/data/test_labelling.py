"""`python -m segmentation.label` on a generated folder: against the real server (killed part-way and
resumed) and locally, checked against the library and read back with pycocotools."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from segmentation.data.labelling import AnswerLog, scan_folder
from segmentation.label import main

ROOT = Path(__file__).resolve().parents[2]
# One class: random weights write to the token budget, which grows with the classes (keeps the test short).
PROMPT = "cat"
IMAGE_COUNT = 50


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """50 small PNG and JPEG images in two subfolders, a corrupt PNG, a text file and a hidden file."""
    root = tmp_path_factory.mktemp("to-label")
    rng = np.random.default_rng(0)
    for i in range(IMAGE_COUNT):
        width, height = (int(v) for v in rng.integers(40, 160, 2))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(sub / f"img{i:02d}.{'jpg' if i % 5 == 0 else 'png'}")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"hidden")
    return root


def images_in(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("img*"))]


def answered(out: Path) -> list[str]:
    """The files of every answer line in the log (a torn last line, from a kill, is not one)."""
    if not (out / "answers.jsonl").exists():
        return []
    records = []
    for line in (out / "answers.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r["file"] for r in records if "answer" in r]


def check_coco_against_library(out: Path, folder: Path, segmenter, names: list[str], prompt: str = PROMPT,
                               **options) -> COCO:
    """coco.json loads with pycocotools; its images are `names`; its masks, boxes and labels are the
    library's answers for the same files (`options`: those of `Segmenter.segment`)."""
    coco = COCO(str(out / "coco.json"))
    assert sorted(image["file_name"] for image in coco.dataset["images"]) == sorted(names)
    categories = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    # The prompt's classes first, then other labels the model wrote.
    assert categories[1] == prompt.split(";")[0].strip()
    images = coco.dataset["images"]
    pictures = [Image.open(folder / image["file_name"]).convert("RGB") for image in images]
    # In batches: the library's batched answers equal its one-at-a-time answers (tests/model).
    library = [r for at in range(0, len(pictures), 10)
               for r in segmenter.segment(pictures[at:at + 10], prompt, **options)]
    for image, expected in zip(images, library):
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert [categories[a["category_id"]] for a in annotations] == [o.label for o in expected.objects]
        for annotation, obj in zip(annotations, expected.objects):
            x0, y0, x1, y1 = obj.box
            assert annotation["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert annotation["score"] == pytest.approx(obj.score, abs=1e-6)
            assert np.array_equal(coco.annToMask(annotation).astype(bool), obj.mask)
    return coco


def copy_images(folder: Path, names: list[str], target: Path) -> Path:
    """`target` holding the files `names` of `folder`, at the same relative paths."""
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes((folder / name).read_bytes())
    return target


def coco_with_rounded_scores(path: Path) -> dict:
    """A coco.json with scores to 5 digits (the server rounds them to 6)."""
    coco = json.loads(path.read_text())
    for annotation in coco["annotations"]:
        annotation["score"] = round(annotation["score"], 5)
    return coco


def run_labeller(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "segmentation.label", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_run_resumes_and_labels_every_image_once(server, segmenter, folder, tmp_path):
    out = tmp_path / "labels"
    args = [str(folder), "--prompt", PROMPT, "--url", server.url, "--out", str(out), "--concurrency", "4"]
    first = run_labeller(args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if len(answered(out)) >= 10:
            break
        time.sleep(0.02)
    first.kill()  # SIGKILL: no clean-up runs, a line may be torn
    first.wait()
    done_before = set(answered(out))
    assert 10 <= len(done_before) < IMAGE_COUNT, "the first run should be stopped part-way"

    second = run_labeller([*args, "--yolo", "--png-masks", "--no-progress"])
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 1, output  # 1: the corrupt file failed
    assert f"{len(done_before)} done by earlier runs" in output
    assert f"labelled {IMAGE_COUNT - len(done_before)} images" in output
    assert "failed: a/broken.png" in output and "skipped: notes.txt" in output

    # Every image answered exactly once over both runs: the resumed run redid nothing.
    answers = Counter(answered(out))
    assert sorted(answers) == images_in(folder) and set(answers.values()) == {1}
    coco = check_coco_against_library(out, folder, segmenter, images_in(folder))

    failures = json.loads((out / "failures.json").read_text())
    assert [f["file"] for f in failures["failed"]] == ["a/broken.png"]
    assert failures["failed"][0]["status"] == 400 and "image" in failures["failed"][0]["error"]
    assert failures["skipped"] == ["notes.txt"]

    # The optional outputs: one YOLO file and one instance map per image, agreeing with coco.json.
    classes = (out / "yolo" / "classes.txt").read_text().splitlines()
    assert classes[0] == "cat"
    for image in coco.dataset["images"]:
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        yolo = (out / "yolo" / image["file_name"]).with_suffix(".txt").read_text().splitlines()
        assert {int(line.split()[0]) for line in yolo} <= {a["category_id"] - 1 for a in annotations}
        instances = np.asarray(Image.open((out / "masks" / image["file_name"]).with_suffix(".png")))
        assert instances.shape == (image["height"], image["width"])
        if annotations:
            last = annotations[-1]
            assert np.array_equal(instances == len(annotations), coco.annToMask(last).astype(bool))

    # A third run finds nothing left but the failure, and rebuilds the same file.
    before = (out / "coco.json").read_text()
    third = run_labeller([*args, "--no-progress"])
    output, _ = third.communicate(timeout=300)
    assert "labelled 0 images" in output and f"{IMAGE_COUNT} done by earlier runs" in output
    assert (out / "coco.json").read_text() == before


def test_local_mode_equals_server(server, tiny_fixtures, segmenter, folder, tmp_path):
    subset = copy_images(folder, images_in(folder)[:5] + ["a/broken.png"], tmp_path / "subset")
    local, remote = tmp_path / "local", tmp_path / "remote"
    common = [str(subset), "--prompt", PROMPT, "--no-progress", "--batch-size", "3"]
    assert main([*common, "--out", str(local), "--model-dir", str(tiny_fixtures / "paligemma"),
                 "--vae", str(tiny_fixtures / "vae-oid.npz")]) == 1
    assert main([*common, "--out", str(remote), "--url", server.url]) == 1
    check_coco_against_library(local, subset, segmenter, images_in(subset))
    assert coco_with_rounded_scores(local / "coco.json") == coco_with_rounded_scores(remote / "coco.json")
    [failure] = json.loads((local / "failures.json").read_text())["failed"]
    assert failure["file"] == "a/broken.png" and "accepted formats" in failure["error"]


def test_labels_from_prompt_makes_the_categories_the_prompts(server, tiny_fixtures, segmenter, folder, tmp_path):
    names = images_in(folder)[:6]
    subset = copy_images(folder, names, tmp_path / "subset")
    common = [str(subset), "--prompt", "cat ; dog", "--no-progress", "--batch-size", "3"]
    local_args = ["--model-dir", str(tiny_fixtures / "paligemma"), "--vae", str(tiny_fixtures / "vae-oid.npz")]
    assert main([*common, "--out", str(tmp_path / "free"), "--url", server.url]) == 0
    assert main([*common, "--out", str(tmp_path / "remote"), "--url", server.url, "--labels-from-prompt"]) == 0
    assert main([*common, "--out", str(tmp_path / "local"), *local_args, "--labels-from-prompt"]) == 0
    coco = check_coco_against_library(tmp_path / "remote", subset, segmenter, names, "cat ; dog",
                                      labels_from_prompt=True)
    assert coco.dataset["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert coco.dataset["annotations"] and {a["category_id"] for a in coco.dataset["annotations"]} <= {1, 2}
    assert (coco_with_rounded_scores(tmp_path / "remote" / "coco.json")
            == coco_with_rounded_scores(tmp_path / "local" / "coco.json"))
    # Without the flag the random demo model writes other labels, which become extra categories.
    assert len(json.loads((tmp_path / "free" / "coco.json").read_text())["categories"]) > 2


def test_bad_prompt_stops_before_any_work(folder, tmp_path, capsys):
    assert main([str(folder), "--prompt", "", "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "o")]) == 2
    assert "prompt" in capsys.readouterr().err
    assert not (tmp_path / "o" / "answers.jsonl").exists()


def test_answer_log_survives_a_torn_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"file": "a.png", "answer": {"n": 1}}\n{"file": "b.png", "error": "bad", "status": 400}\n'
                    '{"file": "c.png", "answ')
    log = AnswerLog.open(path)
    assert list(log.answers) == ["a.png"] and list(log.failures) == ["b.png"]
    log.append({"file": "b.png", "answer": {"n": 2}})
    log.close()
    reread = AnswerLog.open(path)
    assert reread.answers == {"a.png": {"n": 1}, "b.png": {"n": 2}} and reread.failures == {}


def test_scan_folder_skips_other_files_and_the_output_folder(folder):
    scanned = scan_folder(folder, exclude=folder / "a")
    assert scanned.images == [name for name in images_in(folder) if name.startswith("b/")]
    assert scanned.skipped == ["notes.txt"]
