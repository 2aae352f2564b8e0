"""The page's layout, checked from the elements' bounding boxes in a real Chromium: Run on screen without
scrolling (1280×800 and a phone), label chips small, inside the picture, next to their object, never on
each other and off the masks where there is room. The answers are made up (routed), so the objects sit
where the test wants them; the page itself comes from the real server."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from test_webui import open_page, submit, wait_result

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def mask_png(mask: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def ellipse(width: int, height: int, box) -> np.ndarray:
    image = Image.new("L", (width, height), 0)
    ImageDraw.Draw(image).ellipse([box[0], box[1], box[2] - 1, box[3] - 1], fill=255)
    return np.asarray(image) > 0


def made_up_answer(width: int, height: int, objects: list[tuple[str, tuple[int, int, int, int]]]) -> dict:
    """A /segment answer with an ellipse mask inside each box (PNG masks, as the page asks for)."""
    answer = {"prompt": "made up", "text": "made up", "model": "demo", "width": width, "height": height,
              "objects": []}
    for i, (label, box) in enumerate(objects):
        mask = ellipse(width, height, box)
        answer["objects"].append({
            "label": label, "score": round(0.9 - 0.03 * i, 2), "box": list(box),
            "box_normalized": [box[1] / height, box[0] / width, box[3] / height, box[2] / width],
            "area": int(mask.sum()), "mask": {"format": "png", "data": mask_png(mask)},
        })
    return answer


def masks_of(answer: dict) -> list[np.ndarray]:
    return [ellipse(answer["width"], answer["height"], o["box"]) for o in answer["objects"]]


# Six objects touching in a 3×2 grid with room above and below, a tall thin one at the left edge, and one
# with a long label at the top right: chips must not pile up, and need not cover any mask.
GRID = [("cat", (100, 200, 200, 300)), ("dog", (200, 200, 300, 300)), ("person", (300, 200, 400, 300)),
        ("car", (100, 300, 200, 400)), ("bus", (200, 300, 300, 400)), ("bicycle", (300, 300, 400, 400))]
SCENE = GRID + [("tree", (10, 10, 60, 470)), ("a rather long label for one object", (450, 5, 630, 100))]
# Ten objects on nearly the same spot: the chips have to stack.
CROWD = [(f"thing{i}", (60 + 3 * i, 80 + 2 * i, 150 + 3 * i, 160 + 2 * i)) for i in range(10)]


def show(page, server, tmp_path: Path, answer: dict) -> None:
    picture = tmp_path / "picture.png"
    Image.new("RGB", (answer["width"], answer["height"]), (200, 210, 220)).save(picture)
    page.route("**/segment", lambda route: route.fulfill(status=200, content_type="application/json",
                                                         body=json.dumps(answer)))
    open_page(page, server)
    submit(page, picture)
    wait_result(page)


def picture_rect(page, answer: dict) -> dict:
    """Where the picture is shown: the canvas box, less the bands of object-fit: contain."""
    canvas = page.locator("#overlay").bounding_box()
    scale = min(canvas["width"] / answer["width"], canvas["height"] / answer["height"])
    width, height = answer["width"] * scale, answer["height"] * scale
    return {"x": canvas["x"] + (canvas["width"] - width) / 2, "y": canvas["y"] + (canvas["height"] - height) / 2,
            "width": width, "height": height, "scale": scale}


def chips(page) -> list[dict]:
    return page.evaluate("""() => [...document.querySelectorAll('#chips .chip')].map((e) => {
        const r = e.getBoundingClientRect();
        return {index: Number(e.dataset.index), text: e.textContent, x: r.x, y: r.y, width: r.width,
                height: r.height, font: parseFloat(getComputedStyle(e).fontSize)};
    })""")


def overlap(a: dict, b: dict) -> float:
    w = min(a["x"] + a["width"], b["x"] + b["width"]) - max(a["x"], b["x"])
    h = min(a["y"] + a["height"], b["y"] + b["height"]) - max(a["y"], b["y"])
    return max(0.0, w) * max(0.0, h)


def box_on_screen(box, rect: dict) -> dict:
    s = rect["scale"]
    return {"x": rect["x"] + box[0] * s, "y": rect["y"] + box[1] * s, "width": (box[2] - box[0]) * s,
            "height": (box[3] - box[1]) * s}


def gap(a: dict, b: dict) -> float:
    dx = max(0.0, b["x"] - (a["x"] + a["width"]), a["x"] - (b["x"] + b["width"]))
    dy = max(0.0, b["y"] - (a["y"] + a["height"]), a["y"] - (b["y"] + b["height"]))
    return float(np.hypot(dx, dy))


def mask_pixels_under(chip: dict, mask: np.ndarray, rect: dict) -> int:
    """Mask pixels under the chip, its edges taken half a screen pixel in (subpixel positions)."""
    s, inset = rect["scale"], 0.5
    x0 = int(np.floor((chip["x"] + inset - rect["x"]) / s))
    y0 = int(np.floor((chip["y"] + inset - rect["y"]) / s))
    x1 = int(np.ceil((chip["x"] + chip["width"] - inset - rect["x"]) / s))
    y1 = int(np.ceil((chip["y"] + chip["height"] - inset - rect["y"]) / s))
    return int(mask[max(0, y0):max(0, y1), max(0, x0):max(0, x1)].sum())


def assert_chips_laid_out(page, answer: dict, shown: list[int], near: float = 0) -> tuple[list[dict], dict]:
    """One chip per shown object, with its text; inside the picture; none on another; each touching its
    object's box, within 2 screen pixels (or `near` chip heights more); small: at most 13 px type and a chip at most
    1/12 of the picture's shown height (20 px where that is less)."""
    rect = picture_rect(page, answer)
    found = chips(page)
    assert sorted(c["index"] for c in found) == shown
    for chip in found:
        obj = answer["objects"][chip["index"]]
        assert chip["text"] == f"{obj['label']} {obj['score']:.2f}"
        assert chip["x"] >= rect["x"] - 0.5 and chip["y"] >= rect["y"] - 0.5
        assert chip["x"] + chip["width"] <= rect["x"] + rect["width"] + 0.5
        assert chip["y"] + chip["height"] <= rect["y"] + rect["height"] + 0.5
        assert gap(chip, box_on_screen(obj["box"], rect)) <= 2.0 + near * chip["height"], chip
        assert 10 <= chip["font"] <= 13 and chip["height"] <= max(20.0, rect["height"] / 12), chip
    for i, a in enumerate(found):
        for b in found[i + 1:]:
            assert overlap(a, b) <= 0.5, (a, b)
    return found, rect


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280x800", "390x844"])
def test_run_is_on_screen_without_scrolling(server, browser, viewport):
    context = browser.new_context(viewport=viewport, is_mobile=viewport is PHONE)
    try:
        page = open_page(context.new_page(), server)
        assert page.evaluate("window.scrollY") == 0
        for selector in ("#dropzone", "#prompt", "#submit"):
            box = page.locator(selector).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"], selector
            assert box["y"] >= 0 and box["y"] + box["height"] <= viewport["height"], (selector, box)
        # Nothing lies on top of it: the element at its centre is the button.
        run = page.locator("#submit").bounding_box()
        on_top = page.evaluate("([x, y]) => document.elementFromPoint(x, y).id",
                               [run["x"] + run["width"] / 2, run["y"] + run["height"] / 2])
        assert on_top == "submit"
        assert page.evaluate("document.documentElement.scrollWidth") == viewport["width"]
    finally:
        context.close()


def test_run_stays_on_screen_in_a_short_window(server, browser):
    """The action bar is sticky: in a window shorter than the form, Run is still on screen."""
    context = browser.new_context(viewport={"width": 1280, "height": 520})
    try:
        page = open_page(context.new_page(), server)
        form = page.locator("#form").bounding_box()
        assert form["y"] + form["height"] > 520  # the form does run past the window
        run = page.locator("#submit").bounding_box()
        assert run["y"] + run["height"] <= 520
    finally:
        context.close()


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280x800", "390x844"])
def test_chips_beside_their_objects_not_on_each_other_nor_on_masks(server, browser, tmp_path, viewport):
    answer = made_up_answer(640, 480, SCENE)
    context = browser.new_context(viewport=viewport, is_mobile=viewport is PHONE)
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        show(page, server, tmp_path, answer)
        found, rect = assert_chips_laid_out(page, answer, list(range(len(SCENE))))
        masks = masks_of(answer)
        # There is room above and below the grid and beside the others: no chip on any mask there...
        for chip in found:
            if chip["index"] < len(GRID):
                assert sum(mask_pixels_under(chip, m, rect) for m in masks) == 0, chip
        # ...and all chips together cover at most 2 % of their own area with masks (the tree's chip
        # has to sit at the picture's top edge, over the tip of its mask).
        covered = sum(mask_pixels_under(chip, m, rect) for chip in found for m in masks)
        area = sum(chip["width"] * chip["height"] for chip in found) / rect["scale"] ** 2
        assert covered <= 0.02 * area

        # Unticking an object takes its chip away; the others stay laid out.
        page.locator("#objects li").nth(1).get_by_role("checkbox").uncheck()
        assert_chips_laid_out(page, answer, [i for i in range(len(SCENE)) if i != 1])
        assert errors == []
    finally:
        context.close()


def test_chips_stack_when_objects_crowd_one_spot(server, page, tmp_path):
    answer = made_up_answer(224, 224, CROWD)
    show(page, server, tmp_path, answer)
    # Stacked beside each other: each within a few chip heights of its box.
    assert_chips_laid_out(page, answer, list(range(len(CROWD))), near=3)
    # Sized to the picture as shown, not to its 224 pixels: the chips stay small on a scaled-up picture.
    rect = picture_rect(page, answer)
    assert rect["scale"] > 2 and max(c["height"] for c in chips(page)) <= 20


def test_chips_follow_a_resized_window(server, page, tmp_path):
    answer = made_up_answer(640, 480, SCENE)
    show(page, server, tmp_path, answer)
    page.set_viewport_size({"width": 900, "height": 800})
    for _ in range(50):  # laid out again on the next frame (the CSP forbids wait_for_function's eval)
        rect = picture_rect(page, answer)
        first = chips(page)[0]
        if gap(first, box_on_screen(answer["objects"][first["index"]]["box"], rect)) <= 2.0:
            break
        page.wait_for_timeout(100)
    assert_chips_laid_out(page, answer, list(range(len(SCENE))))
    assert page.js_errors == []


def test_downloaded_overlay_has_the_chips_drawn_in(server, page, tmp_path):
    answer = made_up_answer(640, 480, GRID)
    show(page, server, tmp_path, answer)
    on_page = np.asarray(Image.open(io.BytesIO(base64.b64decode(page.evaluate(
        "document.getElementById('overlay').toDataURL('image/png')").split(",", 1)[1]))).convert("RGB"))
    with page.expect_download() as info:
        page.get_by_role("button", name="Download overlay PNG").click()
    saved = np.asarray(Image.open(info.value.path()).convert("RGB"))
    assert saved.shape == on_page.shape == (480, 640, 3)
    changed = np.argwhere(np.abs(saved.astype(int) - on_page.astype(int)).sum(axis=2) > 30)
    assert len(changed) > 0, "no chip drawn into the PNG"
    # The chips are drawn near the objects (within a chip's height of the grid), not anywhere.
    (y0, x0), (y1, x1) = changed.min(axis=0), changed.max(axis=0)
    assert 100 - 40 <= x0 and x1 <= 400 + 200 and 200 - 40 <= y0 and y1 <= 400 + 40
