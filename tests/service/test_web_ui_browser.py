"""The try-it page in a real browser: Debian's chromium, headless, driven by Playwright for Python,
against a live `flowie serve` on the tiny model with an API key configured.

The browser is the system's (no browser download); the page runs under its own Content-Security-
Policy, which the test does not bypass, and any violation fails it. A screenshot of the finished
page is kept in out/web_ui/ (an ignored folder) as the run's artefact.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import skip_or_fail
from PIL import Image
from svc_helpers import ROOT, flowie, free_port, stop, wait_http

KEY = "web-ui-test-key-0123456789abcdef"
CHROMIUM = Path("/usr/bin/chromium")
# Flags for a closed network, as root: nothing reaches out for updates, sync or field trials.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-default-apps",
                 "--disable-dev-shm-usage"]
ARTEFACTS = ROOT / "out" / "web_ui"
PHOTO_SIDE = 96  # the photo sent; upscale 2 -> a 192 x 192 answer
UPSCALE = 2


def _chromium() -> Path:
    found = shutil.which("chromium")
    return Path(found) if found else CHROMIUM


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not _chromium().exists():
        skip_or_fail("chromium is not installed (apt-get install chromium); the page's browser test needs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("playwright is not installed (pip install playwright); the page's browser test needs it")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(_chromium()), headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def web_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("web_ui") / "serve.log"
    process = flowie(["serve", "--model", str(tiny_model_dir), "--port", str(port)], log_path,
                     FLOWIE_API_KEYS=KEY)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", timeout=120, process=process)
        yield base
    finally:
        stop(process)


@pytest.fixture()
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    opened = context.new_page()
    # Content-Security-Policy violations and uncaught exceptions (a 401 or 415 answer's console line is expected).
    opened.browser_errors = []
    opened.on("console", lambda m: opened.browser_errors.append(m.text)
              if m.type == "error" and "Content Security Policy" in m.text else None)
    opened.on("pageerror", lambda e: opened.browser_errors.append(str(e)))
    try:
        yield opened
    finally:
        context.close()


def _photo(path: Path) -> Path:
    """scikit-image's astronaut, scaled down to PHOTO_SIDE px (small: the tiny model runs on the CPU)."""
    from skimage import data

    Image.fromarray(data.astronaut()).resize((PHOTO_SIDE, PHOTO_SIDE), Image.Resampling.LANCZOS).save(path)
    return path


def _open_with_key(page: Any, base: str) -> None:
    page.goto(f"{base}/")
    page.wait_for_selector("#key-row:not([hidden])")  # keys are configured: the page asks for one
    page.fill("#api-key", KEY)
    page.click("#use-key")
    page.wait_for_selector("#field-sampler")  # the form was built from GET models + the OpenAPI document


def test_the_page_restores_a_photo_showing_progress_then_the_result_at_the_size_the_api_gives(
        page, web_server, tmp_path):
    from playwright.sync_api import expect

    _open_with_key(page, web_server)
    assert page.locator("#field-sampler option").all_text_contents()[1:] == [
        "mean_value", "euler", "one_step", "restore_only"]
    page.set_input_files("#image", str(_photo(tmp_path / "astronaut.png")))
    # Slow enough (40 flow steps on a 2-core CPU) for several progress reports to show.
    page.select_option("#field-sampler", "euler")
    page.fill("#field-steps", "40")
    page.fill("#field-upscale", str(UPSCALE))
    page.fill("#field-min_side", "128")
    page.fill("#field-seed", "1234")
    with page.expect_response(lambda r: r.url.endswith("/enhance")) as posted:
        page.click("#submit")
    assert posted.value.status == 202 and posted.value.request.headers.get("prefer") == "respond-async"
    job_id = posted.value.json()["id"]

    # Polled by Playwright's own script (the page's CSP forbids evaluating strings in it).
    expect(page.locator("#progress-text")).to_contain_text("step", timeout=60_000)
    shown_progress = page.locator("#progress-text").text_content()
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)

    status = page.request.get(f"{web_server}/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert (status["width"], status["height"]) == (PHOTO_SIDE * UPSCALE, PHOTO_SIDE * UPSCALE)
    decoded = page.evaluate("[document.getElementById('after').naturalWidth,"
                            " document.getElementById('after').naturalHeight]")
    assert decoded == [status["width"], status["height"]]
    assert "flow_unet" in shown_progress and "of 40" in shown_progress, shown_progress
    facts = page.locator("#facts").inner_text()
    assert "1234" in facts and "Server-Timing compute" in facts and "Server-Timing queue" in facts, facts
    assert page.locator("#download").get_attribute("href").startswith("blob:")

    # The download is the answer's bytes: a PNG of the size the API gave.
    with page.expect_download() as saved:
        page.click("#download")
    downloaded = Image.open(saved.value.path())
    assert downloaded.format == "PNG" and downloaded.size == (status["width"], status["height"])
    assert saved.value.suggested_filename == f"flowie-{job_id}.png"

    # The slider moves the split; 100% shows the answer at its own pixel size.
    page.locator("#slider").fill("30")
    assert page.evaluate("document.getElementById('compare').style.getPropertyValue('--split')") == "30%"
    page.click("[data-zoom='actual']")
    assert page.evaluate("document.getElementById('after').getBoundingClientRect().width") == pytest.approx(
        status["width"], abs=1)
    page.click("[data-zoom='fit']")
    page.locator("#slider").fill("50")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "web_ui.png"), full_page=True)
    assert not page.browser_errors, page.browser_errors


def test_the_page_shows_the_problem_title_and_detail_for_a_text_file(page, web_server, tmp_path):
    _open_with_key(page, web_server)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo\n")
    page.set_input_files("#image", str(notes))
    with page.expect_response(lambda r: r.url.endswith("/enhance")) as posted:
        page.click("#submit")
    assert posted.value.status == 415
    page.wait_for_selector("#problem:not([hidden])")
    assert page.locator("#problem-title").text_content() == "Unsupported media type (415)"
    assert page.locator("#problem-detail").text_content() == posted.value.json()["detail"] != ""
    assert page.locator("#result").is_hidden()
    assert not page.browser_errors, page.browser_errors
