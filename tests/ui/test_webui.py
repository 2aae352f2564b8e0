"""The web page at /ui in a real headless Chromium, against a real `bentoml serve` (tiny random model).

Set UI_SCREENSHOT=docs/ui.png to write the README's screenshot from the page with a result.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from imageserver import ImageServer
from PIL import Image, ImageDraw
from servers import kill_tree, start_server

DEMO_MODEL = "demo/paligemma2-tiny-random"
PROMPT = "cat ; dog"
TIMEOUT_MS = 120_000


def scene(width: int = 224, height: int = 224) -> Image.Image:
    """A small drawn picture (sky, ground, sun, house): a readable screenshot, a fixed answer."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / height
        draw.line([(0, y), (width, y)], fill=(int(110 + 90 * t), int(170 + 50 * t), 235))
    draw.rectangle([0, int(height * 0.68), width, height], fill=(86, 150, 70))
    draw.ellipse([int(width * 0.70), int(height * 0.08), int(width * 0.90), int(height * 0.28)], fill=(250, 205, 60))
    draw.rectangle([int(width * 0.15), int(height * 0.45), int(width * 0.45), int(height * 0.75)], fill=(170, 90, 60))
    draw.polygon([(int(width * 0.12), int(height * 0.46)), (int(width * 0.30), int(height * 0.30)),
                  (int(width * 0.48), int(height * 0.46))], fill=(120, 50, 40))
    rng = np.random.default_rng(3)
    noise = rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ui") / "scene.png"
    scene().save(path)
    return path


def api_answer(server, path: Path, task: str = "segment", prompt: str = PROMPT) -> dict:
    data = {"prompt": prompt, "model": DEMO_MODEL}
    if task == "segment":
        data["mask_format"] = "png"
    with path.open("rb") as f:
        response = httpx.post(f"{server.url}/{task}", files={"image": (path.name, f, "image/png")}, data=data,
                              timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def open_page(page, server, path: str = "/ui/"):
    page.goto(server.url + path)
    # The model list is filled from POST /models.
    # (Locators, not wait_for_function: the page's CSP forbids the eval that wait_for_function uses.)
    page.locator("#model[data-loaded='true']").wait_for(state="attached", timeout=TIMEOUT_MS)
    return page


def submit(page, path: Path | None, prompt: str = PROMPT, task: str = "segment"):
    if path is not None:
        page.get_by_label("Drop an image here").set_input_files(str(path))
    page.get_by_label("Classes, separated by").fill(prompt)
    page.get_by_label("Segment (boxes and masks)" if task == "segment" else "Detect (boxes only)").check()
    page.get_by_role("button", name="Run").click()


def wait_result(page) -> None:
    page.wait_for_selector("#overlay[data-state='result']", timeout=TIMEOUT_MS)
    page.wait_for_selector("#submit:not([disabled])", timeout=TIMEOUT_MS)


def canvas_png(page) -> bytes:
    import base64

    data_url = page.evaluate("document.getElementById('overlay').toDataURL('image/png')")
    return base64.b64decode(data_url.split(",", 1)[1])


def test_page_and_assets_are_served(server):
    response = httpx.get(server.url + "/ui", follow_redirects=False, timeout=10)
    assert response.status_code in (301, 302, 307, 308)
    assert response.headers["location"].endswith("/ui/")
    for path, kind in [("/ui/", "text/html"), ("/ui/index.html", "text/html"), ("/ui/app.js", "text/javascript"),
                       ("/ui/style.css", "text/css")]:
        response = httpx.get(server.url + path, timeout=10)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(kind), path
        assert "default-src 'none'" in response.headers["content-security-policy"]
    assert httpx.get(server.url + "/ui/missing.js", timeout=10).status_code == 404
    html = httpx.get(server.url + "/ui/", timeout=10).text
    # Offline: nothing is loaded from another host, and asset URLs are relative.
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html.replace(
        "https://example.com/picture.jpg", "")
    assert 'href="style.css"' in html and 'src="app.js"' in html


def test_segment_upload_draws_overlay_lists_objects_and_downloads(server, page, picture, tmp_path):
    expected = api_answer(server, picture)
    assert expected["objects"], "the fixture picture should give objects with the tiny model"
    open_page(page, server, "/ui")  # no trailing slash: redirected, assets still load
    assert page.url.endswith("/ui/")
    assert page.locator("#model").input_value() == DEMO_MODEL
    assert page.evaluate("getComputedStyle(document.querySelector('.panel')).borderRadius") == "8px"

    submit(page, picture)
    wait_result(page)

    items = page.locator("#objects li")
    assert items.count() == len(expected["objects"])
    for i, obj in enumerate(expected["objects"]):
        assert items.nth(i).inner_text().startswith(f"{obj['label']} {obj['score']:.2f}")
    assert page.locator("#raw-text").inner_text() == expected["text"]
    assert " ms" in page.locator("#timing").inner_text()
    assert page.locator("#error").is_hidden()
    size = page.evaluate("[document.getElementById('overlay').width, document.getElementById('overlay').height]")
    assert size == [expected["width"], expected["height"]]

    # The overlay is the picture with colored masks and boxes: it differs from the plain picture.
    drawn = np.asarray(Image.open(io.BytesIO(canvas_png(page))).convert("RGB"), dtype=np.int16)
    plain = np.asarray(Image.open(picture).convert("RGB"), dtype=np.int16)
    changed = np.abs(drawn - plain).sum(axis=2) > 30
    assert changed.mean() > 0.002, "nothing drawn over the picture"
    if os.environ.get("UI_SCREENSHOT"):
        page.screenshot(path=os.environ["UI_SCREENSHOT"], full_page=True)
    page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)

    # Unticking an object removes its mask and box from the overlay; ticking it brings them back.
    before = canvas_png(page)
    first = items.nth(0).get_by_role("checkbox")
    first.uncheck()
    assert canvas_png(page) != before
    first.check()
    assert canvas_png(page) == before

    with page.expect_download() as info:
        page.get_by_role("button", name="Download JSON").click()
    saved = json.loads(Path(info.value.path()).read_text())
    assert info.value.suggested_filename.endswith(".json")
    assert len(saved["objects"]) == len(expected["objects"])
    assert saved["text"] == expected["text"] and saved["model"] == DEMO_MODEL
    assert {o["mask"]["format"] for o in saved["objects"] if o["mask"]} <= {"png"}

    with page.expect_download() as info:
        page.get_by_role("button", name="Download overlay PNG").click()
    overlay = Image.open(info.value.path())
    assert overlay.format == "PNG" and overlay.size == (expected["width"], expected["height"])
    assert page.js_errors == []


def test_detect_draws_boxes_without_masks(server, page, picture):
    expected = api_answer(server, picture, task="detect")
    open_page(page, server)
    submit(page, picture, task="detect")
    wait_result(page)
    assert page.locator("#objects li").count() == len(expected["objects"])
    assert page.locator("#raw-text").inner_text() == expected["text"]
    if expected["objects"]:
        assert "no mask" in page.locator("#objects li").nth(0).inner_text()
    assert page.js_errors == []


def test_image_url_is_fetched_by_the_server_and_drawn(server, page, picture):
    expected = api_answer(server, picture)
    with ImageServer({"/scene.png": (200, {"Content-Type": "image/png"}, picture.read_bytes())}) as site:
        open_page(page, server)
        page.get_by_label("or an image URL").fill(site.url("/scene.png", "localhost"))
        submit(page, None)
        wait_result(page)
    assert page.locator("#objects li").count() == len(expected["objects"])
    assert page.locator("#raw-text").inner_text() == expected["text"]
    # Drawn on the server's copy of the picture: not a plain background.
    drawn = np.asarray(Image.open(io.BytesIO(canvas_png(page))).convert("RGB"))
    assert drawn.std() > 20
    with page.expect_download() as info:
        page.get_by_role("button", name="Download JSON").click()
    assert "input_image" not in json.loads(Path(info.value.path()).read_text())


def test_dropped_image_is_previewed(server, page, picture):
    open_page(page, server)
    page.evaluate("""async (bytes) => {
        const file = new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"});
        const data = new DataTransfer();
        data.items.add(file);
        document.getElementById("dropzone").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
    }""", list(picture.read_bytes()))
    page.locator("#overlay[data-state='preview']").wait_for(state="attached")
    assert "dropped.png" in page.locator("#file-name").inner_text()
    assert page.evaluate("[document.getElementById('overlay').width, document.getElementById('overlay').height]") \
        == list(Image.open(picture).size)


def test_busy_state_and_cancel(server, page, picture):
    from playwright.sync_api import expect

    open_page(page, server)
    held = []

    def hold(route):  # never answered: the request stays in flight
        held.append(route)

    page.route("**/segment", hold)
    submit(page, picture)
    run = page.locator("#submit")
    expect(run).to_be_disabled()
    expect(run).to_have_text("Working…")
    expect(page.locator("#result")).to_have_attribute("aria-busy", "true")
    expect(page.locator("#status")).to_contain_text("Working")
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#error")).to_have_text("Cancelled.")
    expect(run).to_be_enabled()
    expect(page.locator("#result")).to_have_attribute("aria-busy", "false")
    assert page.locator("#cancel").is_hidden()


def test_no_image_shows_a_message(server, page):
    open_page(page, server)
    submit(page, None)
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "Choose an image first" in error.inner_text()
    assert page.locator("#overlay").get_attribute("data-state") == "empty"


def test_server_error_is_shown_in_plain_words(server, page, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a picture")
    open_page(page, server)
    submit(page, broken)
    error = page.locator("#error")
    error.wait_for(state="visible", timeout=TIMEOUT_MS)
    text = error.inner_text()
    assert "HTTP 400" in text and "refused" in text
    assert "{" not in text, "the message should be plain words, not JSON"
    assert page.get_by_role("button", name="Run").is_enabled()


def test_list_errors_and_network_failures_are_shown(server, page, picture):
    open_page(page, server)
    from playwright.sync_api import expect

    errors = [{"error": "first problem"}, {"error": "second"}]
    page.route("**/segment", lambda route: route.fulfill(status=400, content_type="application/json",
                                                         body=json.dumps(errors)))
    submit(page, picture)
    page.wait_for_selector("#error:not([hidden])")
    assert "first problem; second" in page.locator("#error").inner_text()

    page.unroute("**/segment")
    page.route("**/segment", lambda route: route.abort("connectionrefused"))
    page.get_by_role("button", name="Run").click()
    expect(page.locator("#error")).to_contain_text("Could not reach the server")
    assert page.get_by_role("button", name="Run").is_enabled()


def test_api_key_is_sent_and_remembered_for_the_tab(server, page, picture):
    open_page(page, server)
    seen: list[str | None] = []

    def capture(route):
        seen.append(route.request.headers.get("authorization"))
        route.continue_()

    page.route("**/segment", capture)
    page.get_by_label("API key (optional)").fill("secret-key-1")
    submit(page, picture)
    wait_result(page)
    assert seen == ["Bearer secret-key-1"]
    page.reload()
    assert page.get_by_label("API key (optional)").input_value() == "secret-key-1"

    page.get_by_label("API key (optional)").fill("")
    submit(page, picture)
    wait_result(page)
    assert seen[-1] is None


@pytest.fixture(scope="module")
def guarded(server_home):
    srv = start_server(server_home, {"SEG_API_KEY": "ui-key-1"})
    yield srv
    kill_tree(srv.process.pid)


def test_page_is_open_on_a_keyed_server_and_the_key_unlocks_the_api(guarded, page, picture):
    from playwright.sync_api import expect

    page.goto(guarded.url + "/ui/")
    expect(page.locator("#model-status")).to_contain_text("API key")  # /models needs the key
    key = page.get_by_label("API key (optional)")
    key.fill("wrong-key")
    submit(page, picture)
    expect(page.locator("#error")).to_contain_text("HTTP 401")
    expect(page.locator("#error")).to_contain_text("API key")

    key.fill("ui-key-1")
    key.blur()  # `change`: the model list is loaded again, with the key
    page.locator("#model[data-loaded='true']").wait_for(state="attached", timeout=TIMEOUT_MS)
    assert page.locator("#model").input_value() == DEMO_MODEL
    page.get_by_role("button", name="Run").click()
    wait_result(page)
    assert page.locator("#error").is_hidden()


def test_narrow_screen_has_no_horizontal_scroll(server, browser, picture, tmp_path):
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True)
    try:
        page = context.new_page()
        open_page(page, server)
        submit(page, picture)
        wait_result(page)
        # A mobile browser widens its layout viewport to the content: compare with the device width.
        assert page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]") == [360, 360]
        width = page.evaluate("document.getElementById('overlay').getBoundingClientRect().width")
        assert 0 < width <= 360
        page.screenshot(path=str(tmp_path / "ui-narrow.png"), full_page=True)
    finally:
        context.close()


def test_every_control_has_an_accessible_name(server, page):
    open_page(page, server)
    unnamed = page.evaluate("""() => [...document.querySelectorAll('input, select, button, textarea')]
        .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map((e) => e.id || e.outerHTML)""")
    assert unnamed == []
