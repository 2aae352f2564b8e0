"""COCO → fine-tuning JSONL on a small hand-made COCO file: polygons, RLE (both kinds), broken
annotations reported by id, the documented object order and limits, and the referring-expression form."""

import itertools
import json

import numpy as np
import pytest
from PIL import Image

from make_vae_fixture import make_vae_checkpoint
from segmentation.data import finetune_set
from segmentation.data.coco import resolve_jsonl_image, segmentation_mask
from segmentation.data.targets import location_bins, tight_box
from segmentation.encoder import MaskEncoder
from segmentation.model.encoding import mask_to_rle, rle_to_mask
from segmentation.tokens import parse_objects

H, W = 60, 80


def rect(y0, x0, y1, x1) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def polygon(y0, x0, y1, x1) -> list[list[float]]:
    """The rectangle polygon whose filled pixels (pycocotools' rule) are rows y0..y1-1, columns x0..x1-1."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: column-major run lengths, the first run counting zeros."""
    flat = mask.T.reshape(-1)
    runs = [len(list(group)) for _, group in itertools.groupby(flat)]
    return {"size": [H, W], "counts": runs if not flat[0] else [0, *runs]}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "v.npz"
    np.savez(path, **make_vae_checkpoint(seed=2))
    return MaskEncoder.from_npz(path)


@pytest.fixture
def dataset(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (W, H)).save(tmp_path / name)
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "car"}]
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": polygon(30, 5, 50, 25), "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 1, "segmentation": polygon(2, 40, 20, 70), "iscrowd": 0},
        {"id": 12, "image_id": 1, "category_id": 2, "segmentation": mask_to_rle(rect(10, 10, 25, 30)),
         "iscrowd": 0, "sentences": [{"sent": "the dog on the left"}, "a small dog"]},
        {"id": 13, "image_id": 2, "category_id": 3, "segmentation": uncompressed_rle(rect(5, 5, 55, 75)),
         "iscrowd": 0},
        # broken ones
        {"id": 20, "image_id": 1, "category_id": 1, "segmentation": [[1, 2, 3, 4]], "iscrowd": 0},
        {"id": 21, "image_id": 1, "category_id": 9, "segmentation": polygon(1, 1, 5, 5), "iscrowd": 0},
        {"id": 22, "image_id": 2, "category_id": 2, "segmentation": {"size": [10, 10], "counts": "abc"},
         "iscrowd": 0},
        {"id": 23, "image_id": 7, "category_id": 2, "segmentation": polygon(1, 1, 5, 5), "iscrowd": 0},
        {"id": 24, "image_id": 2, "category_id": 2, "segmentation": None, "iscrowd": 0},
        {"id": 25, "image_id": 2, "category_id": 1, "segmentation": [[-50, -50, -40, -50, -40, -40]], "iscrowd": 0},
        {"id": 26, "image_id": 1, "category_id": 2, "segmentation": mask_to_rle(rect(0, 0, 60, 80)), "iscrowd": 1},
    ]
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                       {"id": 2, "file_name": "b.png", "height": H, "width": W}],
            "categories": cats, "annotations": anns}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    return tmp_path, coco


def test_masks_from_polygons_and_both_rle_kinds():
    np.testing.assert_array_equal(segmentation_mask(polygon(30, 5, 50, 25), H, W), rect(30, 5, 50, 25))
    np.testing.assert_array_equal(segmentation_mask(mask_to_rle(rect(3, 4, 9, 70)), H, W),
                                  rect(3, 4, 9, 70))
    np.testing.assert_array_equal(segmentation_mask(uncompressed_rle(rect(5, 5, 55, 75)), H, W),
                                  rect(5, 5, 55, 75))


@pytest.mark.parametrize(
    ("segmentation", "message"),
    [({"size": [H, W], "counts": [-4, H * W + 4]}, "non-negative"),
     ({"size": [H, W], "counts": [1.5, H * W - 1.5]}, "non-negative"),
     ({"size": [H, W], "counts": "not an rle"}, "unreadable RLE"),
     ({"size": [H, W], "counts": {"a": 1}}, "counts must be"),
     ([[0, 0, 10, 0, 10]], "even count"), ([], "non-empty"), ("0 0 1 1", "polygon list or an RLE")],
)
def test_malformed_segmentations_are_named(segmentation, message):
    with pytest.raises(ValueError, match=message):
        segmentation_mask(segmentation, H, W)


def test_class_lines_with_order_and_bad_annotations_reported(dataset, encoder):
    folder, coco = dataset
    records, report = finetune_set.convert(coco, folder, encoder, jsonl_dir=folder, progress=False)
    assert [r["prefix"] for r in records] == ["segment cat ; dog", "segment car"]
    assert records[0]["image"] == "a.png"  # relative to the JSONL file's folder
    objects = parse_objects(records[0]["suffix"])
    assert [o.label for o in objects] == ["cat", "cat", "dog"]
    # position order: the cat at the top (rows 2..) before the one below (rows 30..)
    expected = [rect(2, 40, 20, 70), rect(30, 5, 50, 25), rect(10, 10, 25, 30)]
    assert [o.locs for o in objects] == [location_bins(tight_box(m)) for m in expected]
    assert all(o.codes is not None for o in objects)
    assert [o.label for o in parse_objects(records[1]["suffix"])] == ["car"]
    reasons = {e["annotation_id"]: e["reason"] for e in report.errors}
    assert set(reasons) == {20, 21, 22, 23, 24, 25}
    assert "3 points" in reasons[20] and "category_id 9" in reasons[21] and "size" in reasons[22]
    assert "image_id 7" in reasons[23] and "no pixel" in reasons[25]
    assert (report.lines, report.objects, report.crowd) == (2, 4, 1)


def test_masks_field_is_the_exact_ground_truth_in_suffix_order(dataset, encoder):
    folder, coco = dataset
    records, _ = finetune_set.convert(coco, folder, encoder, jsonl_dir=folder, progress=False)
    assert [[rle_to_mask(m).tolist() for m in r["masks"]] for r in records] == [
        [rect(2, 40, 20, 70).tolist(), rect(30, 5, 50, 25).tolist(), rect(10, 10, 25, 30).tolist()],
        [rect(5, 5, 55, 75).tolist()],
    ]
    assert all(len(r["masks"]) == len(parse_objects(r["suffix"])) for r in records)
    refs, _ = finetune_set.convert(coco, folder, encoder, jsonl_dir=folder, refexp=True, progress=False)
    assert [rle_to_mask(m).tolist() for r in refs for m in r["masks"]] == [rect(10, 10, 25, 30).tolist()] * 2
    bare, _ = finetune_set.convert(coco, folder, encoder, jsonl_dir=folder, masks=False, progress=False)
    assert [set(r) for r in bare] == [{"image", "prefix", "suffix"}] * 2


def test_image_paths_are_relative_to_the_jsonl_folder(dataset, encoder, tmp_path_factory):
    """Wherever the set is written, `jsonl folder / image` is the image (as the evaluation reads it)."""
    folder, coco = dataset
    elsewhere = tmp_path_factory.mktemp("sets") / "deep" / "er"
    for jsonl_dir, expected in [(folder, "a.png"), (folder / "sub", "../a.png"), (elsewhere, None)]:
        records, _ = finetune_set.convert(coco, folder, encoder, jsonl_dir=jsonl_dir, progress=False)
        image = records[0]["image"]
        assert expected is None or image == expected
        assert not image.startswith("/") and resolve_jsonl_image(jsonl_dir / "set.jsonl", image).resolve() == (
            folder / "a.png").resolve()


def test_order_limits_and_classes_per_line(dataset, encoder):
    folder, coco = dataset
    records, report = finetune_set.convert(coco, folder, encoder, jsonl_dir=folder, classes_per_line=1, max_objects=1,
                                           order="area", progress=False)
    assert [r["prefix"] for r in records] == ["segment cat", "segment dog", "segment car"]
    [largest_cat] = parse_objects(records[0]["suffix"])  # 30x18 = 540 px beats 20x20 = 400 px
    assert largest_cat.locs == location_bins(tight_box(rect(2, 40, 20, 70)))
    assert report.over_limit == 1
    by_id, _ = finetune_set.convert(coco, folder, encoder, jsonl_dir=folder, order="id", progress=False)
    assert parse_objects(by_id[0]["suffix"])[0].locs == location_bins(tight_box(rect(30, 5, 50, 25)))


def test_refexp_lines_have_one_expression_and_one_mask(dataset, encoder):
    folder, coco = dataset
    records, _ = finetune_set.convert(coco, folder, encoder, jsonl_dir=folder, refexp=True, progress=False)
    assert [r["prefix"] for r in records] == ["segment the dog on the left", "segment a small dog"]
    [obj] = parse_objects(records[0]["suffix"])
    assert obj.label == "" and obj.locs == location_bins(tight_box(rect(10, 10, 25, 30)))
    assert records[0]["suffix"] == records[1]["suffix"]


def test_a_class_whose_objects_all_fail_leaves_the_prompt(dataset, encoder):
    folder, coco = dataset
    coco["categories"].append({"id": 4, "name": "bad ; name"})
    coco["annotations"].append({"id": 30, "image_id": 2, "category_id": 4, "segmentation": polygon(1, 1, 9, 9)})
    records, report = finetune_set.convert(coco, folder, encoder, jsonl_dir=folder, progress=False)
    assert [r["prefix"] for r in records] == ["segment cat ; dog", "segment car"]
    assert any(e["annotation_id"] == 30 and "';'" in e["reason"] for e in report.errors)


def test_missing_image_file_is_reported(dataset, encoder):
    folder, coco = dataset
    (folder / "b.png").unlink()
    records, report = finetune_set.convert(coco, folder, encoder, jsonl_dir=folder, progress=False)
    assert [r["prefix"] for r in records] == ["segment cat ; dog"]
    assert any(e["annotation_id"] == 13 and "not found" in e["reason"] for e in report.errors)


def test_command_line(dataset, tmp_path_factory, capsys):
    folder, _ = dataset
    vae = tmp_path_factory.mktemp("cli") / "vae.npz"
    np.savez(vae, **make_vae_checkpoint(seed=2))
    out, errors = folder / "train.jsonl", folder / "errors.json"
    assert finetune_set.main(["--annotations", str(folder / "instances.json"), "--images", str(folder),
                              "--vae", str(vae), "--out", str(out), "--errors", str(errors)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(line) for line in lines] == [{"image", "prefix", "suffix", "masks"}] * 2
    stderr = capsys.readouterr().err
    assert "skipped annotation 20:" in stderr and "2 lines, 4 objects" in stderr
    assert len(json.loads(errors.read_text())) == 6
    bare = folder / "bare.jsonl"
    assert finetune_set.main(["--annotations", str(folder / "instances.json"), "--images", str(folder),
                              "--vae", str(vae), "--out", str(bare), "--no-masks", "--no-progress"]) == 0
    assert [set(json.loads(line)) for line in bare.read_text().splitlines()] == [{"image", "prefix", "suffix"}] * 2
