"""The playground in a real browser: headless Chromium from Debian's packages, driven by Playwright for Python with
the system browser's executable path (no browser download), against `pixart serve`'s HTTP port on the real engine.

`.ci/run` installs both (apt's chromium, PyPI's playwright); without them the tests skip naming what is missing.
Run alone: `python -m pytest tests/acceptance/test_playground.py`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import urllib.request

import numpy as np
import pytest
from PIL import Image

from server.client import Client
from tests.support.servers import ServerProcess

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install "
                                                             "playwright); the browser tests need it")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                                                            "(apt-get install chromium)")]
# what a headless Chromium needs on a machine with no network and no display
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
KEY = "playground-key-0123456789"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("run") / "store")  # `pixart serve`, as a user starts it
    yield srv
    srv.stop()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.errors = []
    page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(f"http://127.0.0.1:{server.http_port}/")
    page.wait_for_selector("body[data-ready='1']")
    yield page
    context.close()


def _fill(page, *, prompt: str, size: tuple[int, int], steps: int, seed: int | None = None, previews: int = 3) -> None:
    page.fill("#f-prompt", prompt)
    page.select_option("#f-image_size", "custom")
    page.fill("#f-width", str(size[0]))
    page.fill("#f-height", str(size[1]))
    page.fill("#f-num_inference_steps", str(steps))
    page.fill("#f-preview_every", str(previews))
    page.fill("#f-seed", "" if seed is None else str(seed))


def _ended(page) -> None:
    page.wait_for_selector("body[data-ended]", timeout=120_000)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_the_page_loads_its_form_from_the_schema_without_console_errors(page) -> None:
    for name in ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "style", "scheduler",
                 "num_images", "enable_safety_checker", "output_format", "preview_every"):
        label = page.locator(f"label[for='f-{name}']")
        assert label.count() == 1, name  # every control has its label (screen readers, focus)
    assert page.locator("#f-style option").count() >= 10
    assert page.errors == []


def test_a_prompt_shows_progress_a_preview_then_the_image_grpc_makes(page, server) -> None:
    _fill(page, prompt="a red circle on a blue background", size=(512, 256), steps=12, seed=5)
    page.click("#generate")
    _ended(page)
    assert int(page.evaluate("document.body.dataset.previews || 0")) >= 1
    assert page.locator("#status").inner_text().startswith("Done: seed 5")
    src = page.locator("img.result").first.get_attribute("src")
    with urllib.request.urlopen(src, timeout=30) as answer:
        shown = _pixels(answer.read())
    with Client(server.address, timeout=120) as client:
        made = client.generate("a red circle on a blue background", image_size=(512, 256), num_inference_steps=12,
                               seed=5)
    assert np.array_equal(shown, _pixels(made.images[0].file_data))
    assert page.errors == []


def test_cancel_stops_a_long_request(page) -> None:
    _fill(page, prompt="a long one", size=(2048, 2048), steps=100, previews=0)
    page.click("#generate")
    page.wait_for_selector("#status:text-matches('^Step ')", timeout=60_000)
    page.click("#cancel")
    _ended(page)
    assert "CANCELLED" in page.locator("#status").inner_text()


def test_a_bad_field_shows_its_message_at_the_field(page) -> None:
    _fill(page, prompt="x", size=(512, 512), steps=0)
    page.click("#generate")
    page.wait_for_selector("#e-num_inference_steps:not(:empty)")
    assert "from 1 to 100" in page.locator("#e-num_inference_steps").inner_text()
    assert page.evaluate("document.activeElement.id") == "f-num_inference_steps"  # focus goes to the field


def test_a_keyed_server_asks_for_the_key_and_works_with_it(browser, tmp_path) -> None:
    srv = ServerProcess(tmp_path / "store", "--api-key", KEY)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{srv.http_port}/playground")
        page.wait_for_selector("body[data-ready='1']")
        assert page.locator("#key-box").is_visible()
        page.fill("#api-key", KEY)
        page.click("#key-save")
        assert page.evaluate("sessionStorage.getItem('pixart-key')") == KEY and KEY not in page.url
        _fill(page, prompt="a green square", size=(256, 256), steps=4)
        page.click("#generate")
        _ended(page)
        assert page.locator("img.result").count() == 1
    finally:
        context.close()
        srv.stop()


def test_the_copy_as_curl_command_returns_the_same_image(page, server) -> None:
    _fill(page, prompt="a yellow triangle", size=(256, 256), steps=6, seed=9)
    page.click("#generate")
    _ended(page)
    page.click("#copy-box summary")  # open the panel, as a user would
    page.select_option("#copy-kind", "curl")
    command = page.locator("#copy-text").inner_text()
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PIXART_KEY": "unused"})
    url = json.loads(done.stdout)["images"][0]["url"]
    with urllib.request.urlopen(url, timeout=30) as fetched:
        from_curl = _pixels(fetched.read())
    with urllib.request.urlopen(page.locator("img.result").first.get_attribute("src"), timeout=30) as shown:
        assert np.array_equal(from_curl, _pixels(shown.read()))
