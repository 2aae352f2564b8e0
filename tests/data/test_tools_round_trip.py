"""The data tools together: a COCO file → `finetune_set` JSONL (with exact masks) → the evaluation
command in library mode on the demo fixtures; and the ground truth scored against itself, which checks
encoder, `<loc>` boxes, decoder and the metric as one."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segmentation.data import evaluate, finetune_set
from segmentation.data.coco import resolve_jsonl_image
from segmentation.data.targets import tight_box
from segmentation.evaluation import referring_metrics
from segmentation.model.encoding import mask_to_rle, rle_to_mask
from segmentation.vae import MaskDecoder
from train_vae_fixture import random_scene

DOCS = Path(__file__).resolve().parents[2] / "docs"
METRIC_KEYS = {"miou", "ciou", "boxacc@0.5", "boxacc@0.75", "invalid", "total", "coco/AP", "coco/AP50",
               "missing", "unmatched_labels", "run"}
HELD_OUT_SEED = 11_2026  # not the fixture VAE's training seed


@pytest.fixture(scope="module")
def coco_file(tmp_path_factory):
    """The README's example file (3 good objects, 1 broken) plus two synthetic non-square images of
    held-out shapes given as RLE, all in one COCO file in a folder of its own."""
    folder = tmp_path_factory.mktemp("coco")
    (folder / "images").mkdir()
    coco = json.loads((DOCS / "example-coco.json").read_text())
    Image.open(DOCS / "example.png").save(folder / "images" / "example.png")
    rng = np.random.default_rng(HELD_OUT_SEED)
    for image_id, (height, width) in [(2, (180, 320)), (3, (300, 140))]:
        Image.new("RGB", (width, height)).save(folder / "images" / f"{image_id}.png")
        coco["images"].append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
        for mask in random_scene(rng, height, width, 3):
            coco["annotations"].append({"id": 100 + len(coco["annotations"]), "image_id": image_id,
                                        "category_id": 3, "segmentation": mask_to_rle(mask), "iscrowd": 0})
    path = folder / "instances.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture(scope="module")
def jsonl_set(coco_file, tiny_fixtures, tmp_path_factory):
    """The fine-tuning set, one class a line, written to another folder than the images'."""
    out = tmp_path_factory.mktemp("sets") / "train.jsonl"
    assert finetune_set.main(["--annotations", str(coco_file), "--images", str(coco_file.parent / "images"),
                              "--vae", str(tiny_fixtures / "vae-oid.npz"), "--out", str(out),
                              "--classes-per-line", "1", "--no-progress"]) == 0
    return out


def test_finetune_set_then_evaluation_command(jsonl_set, tiny_fixtures, tmp_path):
    lines = [json.loads(line) for line in jsonl_set.read_text().splitlines()]
    assert len(lines) == 5  # example.png: car, cat, sun; each synthetic image: its shapes
    assert all(resolve_jsonl_image(jsonl_set, line["image"]).is_file() for line in lines)
    out = tmp_path / "run.jsonl"
    assert evaluate.main(["--jsonl", str(jsonl_set), "--model-dir", str(tiny_fixtures / "paligemma"),
                          "--vae", str(tiny_fixtures / "vae-oid.npz"), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads(out.with_suffix(".metrics.json").read_text())
    assert METRIC_KEYS <= set(summary)
    assert summary["total"] == len(lines) and summary["missing"] == 0 and summary["run"]["failed"] == 0
    # The outcome file recorded the set's exact masks as the ground truth, not a decoded approximation.
    outcomes = evaluate.read_outcomes(out)
    assert [[o["mask"] for o in outcomes[str(n)]["ground_truth"]] for n in range(1, len(lines) + 1)] == [
        line["masks"] for line in lines]


def test_ground_truth_scores_itself(jsonl_set, tiny_fixtures):
    """Each suffix object as a model answer against its own exact mask and the mask's tight box:
    only the encoder's 16 codes, the 1/1023 bins and the decoder stand between them."""
    decoder = MaskDecoder.from_npz(tiny_fixtures / "vae-oid.npz")
    texts, masks, boxes = [], [], []
    for line in map(json.loads, jsonl_set.read_text().splitlines()):
        objects = line["suffix"].split(" ; ")  # labels never hold ";" (the writer refuses them)
        assert len(objects) == len(line["masks"])
        for text, rle in zip(objects, line["masks"]):
            mask = rle_to_mask(rle)
            texts.append(text)
            masks.append(mask)
            boxes.append(tight_box(mask))  # (y1, x1, y2, x2), independent of the suffix's bins
    metrics = referring_metrics(texts, masks, boxes, decoder)
    assert metrics["total"] == len(texts) >= 8 and metrics["invalid"] == 0
    assert metrics["miou"] >= 0.85, metrics
    assert metrics["boxacc@0.5"] == 1 and metrics["boxacc@0.75"] == 1, metrics


def test_referring_lines_evaluate_with_their_phrase(coco_file, tiny_fixtures, tmp_path):
    out = tmp_path / "refs.jsonl"
    assert finetune_set.main(["--annotations", str(coco_file), "--images", str(coco_file.parent / "images"),
                              "--vae", str(tiny_fixtures / "vae-oid.npz"), "--out", str(out), "--refexp",
                              "--no-progress"]) == 0
    dataset = evaluate.load_jsonl_set(out)  # exact masks: no decoder needed
    assert sorted(dataset.categories) == ["the brown cat", "the red car"]
    [cat] = dataset.examples[0].load_objects(640, 480)
    assert cat.label == "the brown cat" and cat.box == pytest.approx(tight_box(cat.mask), abs=1e-3)


def test_coco_mode_reads_the_same_file(coco_file, tiny_fixtures, tmp_path, caplog):
    """The evaluation's COCO reader is the set writer's: the broken annotation (id 4) is logged and
    left out, the others are scored."""
    out = tmp_path / "coco.jsonl"
    assert evaluate.main(["--coco", str(coco_file), "--images", str(coco_file.parent / "images"),
                          "--model-dir", str(tiny_fixtures / "paligemma"), "--vae", str(tiny_fixtures / "vae-oid.npz"),
                          "--out", str(out), "--no-progress", "--labels-from-prompt"]) == 0
    summary = json.loads(out.with_suffix(".metrics.json").read_text())
    assert summary["total"] == 3 and METRIC_KEYS <= set(summary)
    assert "annotation 4 left out" in caplog.text
    first = evaluate.read_outcomes(out)["1"]
    assert first["prompt"] == "segment cat ; car ; sun"
    assert [o["label"] for o in first["ground_truth"]] == ["cat", "car", "sun"]
    # Ground-truth boxes are (y1, x1, y2, x2): the cat polygon spans x 120..340, y 168..380 of 640x480.
    dataset = evaluate.CocoSet(coco_file, coco_file.parent / "images")
    cat = dataset.examples[0].load_objects(640, 480)[0]
    assert cat.box == pytest.approx((168 / 480, 120 / 640, 380 / 480, 340 / 640), abs=2 / 480)
    with pytest.raises(ValueError, match="annotated as 640x480"):
        dataset.examples[0].load_objects(480, 640)
