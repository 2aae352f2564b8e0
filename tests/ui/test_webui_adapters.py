"""The web page's model list shows LoRA adapters with their base, and a request through the page can name one."""

from __future__ import annotations

from lora import SERVED_ADAPTERS
from playwright.sync_api import expect
from test_webui import DEMO_MODEL, open_page, submit, wait_result


def test_the_model_list_shows_adapters_and_runs_one(adapter_server, page, tmp_path):
    from PIL import Image

    open_page(page, adapter_server)
    options = page.locator("#model option").all_inner_texts()
    assert options == [f"{DEMO_MODEL} (default)", *(f"{a} (LoRA of {DEMO_MODEL})" for a in SERVED_ADAPTERS)]
    page.locator("#model").select_option("acme/lora-a")
    expect(page.locator("#model-status")).to_contain_text(f"It is a LoRA adapter of {DEMO_MODEL}.")

    picture = tmp_path / "grey.png"
    Image.new("RGB", (120, 90), (120, 130, 140)).save(picture)
    submit(page, picture, prompt="cat")
    wait_result(page)
    assert " · acme/lora-a · " in page.locator("#timing").inner_text()
    assert page.js_errors == []
