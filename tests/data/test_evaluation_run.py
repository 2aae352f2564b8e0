"""The evaluation command on small hand-made JSONL and COCO sets: library mode with the real tiny model
and decoder, resuming, and server mode against a real `bentoml serve`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from segmentation.data.evaluate import load_jsonl_set, main, read_outcomes
from segmentation.evaluation import referring_metrics
from segmentation.model.encoding import mask_to_rle, rle_to_mask
from segmentation.vae import MaskDecoder

SIZES = [(64, 48), (40, 72), (90, 60), (50, 50)]
PROMPTS = ["segment cat ; dog", "segment the man on the left", "segment car", "segment cat"]
REFERRING_KEYS = ("miou", "ciou", "boxacc@0.5", "boxacc@0.75", "invalid", "total")


def segs(seed: int) -> str:
    return "".join(f"<seg{c:03d}>" for c in np.random.default_rng(seed).integers(0, 128, 16))


@pytest.fixture(scope="module")
def jsonl_set(tmp_path_factory):
    """Four images; lines 1 and 3 give their masks as RLE, the others leave them to the suffix's codes."""
    folder = tmp_path_factory.mktemp("jsonl-set")
    (folder / "images").mkdir()
    lines = []
    for i, ((width, height), prompt) in enumerate(zip(SIZES, PROMPTS)):
        pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
        label = prompt.split(" ", 1)[1].split(" ; ")[0]
        suffix = f"<loc0100><loc0200><loc0900><loc0800>{segs(i)} {label}"
        line = {"image": f"images/{i}.png", "prefix": prompt, "suffix": suffix}
        if i % 2 == 0:
            mask = np.zeros((height, width), bool)
            mask[height // 4: height // 2, width // 5: width // 2] = True
            line["masks"] = [mask_to_rle(mask)]
        lines.append(json.dumps(line))
    path = folder / "set.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def library_args(fixtures, *extra):
    return ["--model-dir", str(fixtures / "paligemma"), "--vae", str(fixtures / "vae-oid.npz"), "--no-progress",
            "--batch-size", "3", *extra]


def test_library_run_matches_referring_metrics_and_resumes(tiny_fixtures, jsonl_set, tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    assert main(["--jsonl", str(jsonl_set), "--out", str(out), "--limit", "2", *library_args(tiny_fixtures)]) == 0
    assert len(read_outcomes(out)) == 2
    with out.open("a") as f:
        f.write('{"key": "3", "image_id"')  # a line cut short by an interrupted run
    assert main(["--jsonl", str(jsonl_set), "--out", str(out), *library_args(tiny_fixtures)]) == 0
    summary = json.loads(out.with_suffix(".metrics.json").read_text())
    assert summary["run"]["answered"] == 2  # only the two examples the first run left
    assert summary["total"] == 4 and summary["missing"] == 0
    assert "images/s" in capsys.readouterr().out

    # The same numbers as the public function on the recorded texts and the set's own ground truth.
    decoder = MaskDecoder.from_npz(tiny_fixtures / "vae-oid.npz")
    outcomes = read_outcomes(out)
    dataset = load_jsonl_set(jsonl_set, decoder)
    texts, masks, boxes = [], [], []
    for example in dataset.examples:
        outcome = outcomes[example.key]
        [first, *_] = example.load_objects(outcome["width"], outcome["height"])
        assert rle_to_mask(outcome["ground_truth"][0]["mask"]).tolist() == first.mask.tolist()
        texts.append(outcome["text"])
        masks.append(first.mask)
        boxes.append(first.box)
    expected = referring_metrics(texts, masks, boxes, decoder)
    assert {k: summary[k] for k in REFERRING_KEYS} == pytest.approx(expected)

    # A fresh run in one go gives the same outcomes and metrics.
    again = tmp_path / "again.jsonl"
    assert main(["--jsonl", str(jsonl_set), "--out", str(again), *library_args(tiny_fixtures)]) == 0
    assert [o["text"] for o in read_outcomes(again).values()] == texts
    fresh = json.loads(again.with_suffix(".metrics.json").read_text())
    assert {k: v for k, v in fresh.items() if k != "run"} == {k: v for k, v in summary.items() if k != "run"}


def test_ground_truth_from_codes_is_the_decoded_pasted_mask(tiny_fixtures, jsonl_set):
    from segmentation.model.masks import paste_mask
    from segmentation.model.tokens import box_to_pixels

    decoder = MaskDecoder.from_npz(tiny_fixtures / "vae-oid.npz")
    example = load_jsonl_set(jsonl_set, decoder).examples[1]  # no masks field
    width, height = SIZES[1]
    [obj] = example.load_objects(width, height)
    [map64] = decoder.decode(np.array([[int(s) for s in segs(1).replace("<seg", " ").split(">") if s.strip()]]))
    assert obj.mask.tolist() == paste_mask(map64, box_to_pixels((100, 200, 900, 800), width, height),
                                           width, height).tolist()
    assert obj.box == pytest.approx((100 / 1023, 200 / 1023, 900 / 1023, 800 / 1023))  # (y1, x1, y2, x2)
    with pytest.raises(ValueError, match="--vae"):
        load_jsonl_set(jsonl_set).examples[1].load_objects(width, height)


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    """Two images with cats and a dog, one crowd region, as a COCO instances file."""
    folder = tmp_path_factory.mktemp("coco-set")
    images, annotations = [], []
    for image_id, (width, height) in enumerate([(60, 40), (48, 64)], start=1):
        Image.fromarray(np.random.default_rng(image_id).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            folder / f"{image_id}.jpg")
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": width, "height": height})
    for image_id, category, x, y, crowd in [(1, 1, 5, 5, 0), (1, 2, 30, 10, 0), (2, 1, 10, 20, 0), (2, 2, 0, 0, 1)]:
        polygon = [x, y, x + 15, y, x + 15, y + 12, x, y + 12]
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                            "segmentation": [polygon], "area": 180.0, "bbox": [x, y, 15, 12], "iscrowd": crowd})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}))
    return path


def test_coco_set_with_labels_from_prompt(tiny_fixtures, coco_set, tmp_path):
    out = tmp_path / "coco.jsonl"
    args = ["--coco", str(coco_set), "--images", str(coco_set.parent), "--out", str(out), "--labels-from-prompt"]
    assert main(args + library_args(tiny_fixtures)) == 0
    summary = json.loads(out.with_suffix(".metrics.json").read_text())
    outcomes = read_outcomes(out)
    assert [o["prompt"] for o in outcomes.values()] == ["segment cat ; dog", "segment cat"]  # crowd dog left out
    detections = [d for o in outcomes.values() for d in o["detections"]]
    assert detections and summary["unmatched_labels"] == 0
    assert all(d["label"] in ("cat", "dog") and d["category_id"] == {"cat": 1, "dog": 2}[d["label"]]
               for d in detections)
    assert 0.0 <= summary["coco/AP"] <= 1.0 and summary["total"] == 2


def test_server_mode_equals_library_mode(server, tiny_fixtures, jsonl_set, tmp_path):
    library, served = tmp_path / "library.jsonl", tmp_path / "served.jsonl"
    assert main(["--jsonl", str(jsonl_set), "--out", str(library), *library_args(tiny_fixtures)]) == 0
    assert main(["--jsonl", str(jsonl_set), "--out", str(served), "--url", server.url, "--vae",
                 str(tiny_fixtures / "vae-oid.npz"), "--no-progress", "--batch-size", "4"]) == 0
    assert [o["text"] for o in read_outcomes(served).values()] == [o["text"] for o in read_outcomes(library).values()]
    by_library = json.loads(library.with_suffix(".metrics.json").read_text())
    by_server = json.loads(served.with_suffix(".metrics.json").read_text())
    assert {k: by_server[k] for k in REFERRING_KEYS} == pytest.approx({k: by_library[k] for k in REFERRING_KEYS})
    assert by_server["coco/AP"] == pytest.approx(by_library["coco/AP"], abs=1e-6)


def test_server_mode_passes_labels_from_prompt(server, tiny_fixtures, coco_set, tmp_path):
    library, served = tmp_path / "library.jsonl", tmp_path / "served.jsonl"
    coco = ["--coco", str(coco_set), "--images", str(coco_set.parent), "--labels-from-prompt"]
    assert main([*coco, "--out", str(library), *library_args(tiny_fixtures)]) == 0
    assert main([*coco, "--out", str(served), "--url", server.url, "--no-progress", "--batch-size", "2"]) == 0
    by_library, by_server = read_outcomes(library), read_outcomes(served)
    assert [o["text"] for o in by_server.values()] == [o["text"] for o in by_library.values()]
    detections = [d for o in by_server.values() for d in o["detections"]]
    assert detections and all(d["label"] in ("cat", "dog") for d in detections)
    summary = json.loads(served.with_suffix(".metrics.json").read_text())
    assert summary["unmatched_labels"] == 0
    assert summary["coco/AP"] == pytest.approx(json.loads(library.with_suffix(".metrics.json").read_text())["coco/AP"])


def test_clear_errors_for_missing_arguments(jsonl_set, tmp_path, tiny_fixtures):
    with pytest.raises(SystemExit, match="--vae"):
        main(["--jsonl", str(jsonl_set), "--out", str(tmp_path / "x.jsonl"), "--model-dir",
              str(tiny_fixtures / "paligemma")])
    with pytest.raises(SystemExit, match="--images"):
        main(["--coco", str(jsonl_set), "--out", str(tmp_path / "x.jsonl"), "--url", "http://127.0.0.1:1"])


def test_label_less_referring_lines_take_their_phrase(tmp_path):
    """Referring-expression lines (the fine-tuning tool's --refexp) have no label in the suffix."""
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    mask = np.zeros((10, 20), bool)
    mask[2:6, 3:9] = True
    line = {"image": "a.png", "prefix": "segment the brown cat", "masks": [mask_to_rle(mask)],
            "suffix": f"<loc0100><loc0200><loc0600><loc0450>{segs(0)}"}
    (tmp_path / "refs.jsonl").write_text(json.dumps(line) + "\n")
    dataset = load_jsonl_set(tmp_path / "refs.jsonl")
    assert dataset.categories == {"the brown cat": 1}
    [obj] = dataset.examples[0].load_objects(20, 10)
    assert obj.label == "the brown cat" and obj.mask.tolist() == mask.tolist()
    with pytest.raises(ValueError, match="size"):
        dataset.examples[0].load_objects(10, 20)
