"""The page in a real browser: Debian's Chromium, driven by Playwright, against a real uvicorn server.

The page is loaded from 127.0.0.1, a generated photo is uploaded through the file input, and the test
waits for the verdict and the overlay canvas; moving the threshold slider must redraw the map in the
browser. Screenshots go to pytest's tmp folder and, when ``CRACKSCAN_SCREENSHOT_DIR`` is set, there too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from conftest import concrete_photo
from crackscan.model import load_model, read_meta
from crackscan.scan import scan_photo
from crackscan.serve import create_app
from live_server import live_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (Debian package chromium)"),
]

# A hash of the canvas pixels, computed in the page, to see whether the drawing changed.
CANVAS_DIGEST = """() => {
  const c = document.getElementById('overlay');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let h = 0;
  for (let i = 0; i < d.length; i += 7) h = (h * 31 + d[i]) >>> 0;
  return [c.width, c.height, h];
}"""


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "wall-photo.jpg"
    concrete_photo(np.random.default_rng(5), 1600, 1200).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def varied_model_path(tiny_model_path, photo_path, tmp_path_factory) -> Path:
    """The tiny random model with its head stretched so that its map of the photo spans 0.1 to 0.9.

    The random head gives probabilities within a hair of 0.5 everywhere; scaling the head's weights by
    ``k`` and shifting the crack logit by the median makes ``p = sigmoid(k (d - median d))``.
    """
    model = load_model(tiny_model_path)
    p = scan_photo(model, photo_path).probability.astype(np.float64)
    d = np.log(p / (1 - p))
    k = 2.2 / max(float(d.std()), 1e-9)
    head = model.module.classifier[-1]
    with torch.no_grad():
        head.weight.mul_(k)
        head.bias.mul_(k)
        head.bias[model.crack_index] -= k * float(np.median(d))
    # Scans judge at the scan threshold: the page must start there, not at the patch threshold. Chosen thresholds
    # lie off the slider's 0.01 steps; this one just below a cell of the map that the step nearest it would
    # not flag, so that judging at the slider's step instead of the threshold changes the answer.
    path = model.save(tmp_path_factory.mktemp("varied") / "varied.safetensors")
    stretched = load_model(path)
    values = np.sort(scan_photo(stretched, photo_path).probability.ravel())
    cell = next(v for v in values if 0.3 < v < 0.7 and 0.6 < (v * 100) % 1 < 0.95)
    stretched.meta["scan_threshold"] = float(cell) - 0.0005
    return stretched.save(path)


@pytest.fixture(scope="module")
def server(varied_model_path):
    with live_server(create_app(str(varied_model_path))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def keep_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("CRACKSCAN_SCREENSHOT_DIR"):
        folder = Path(os.environ["CRACKSCAN_SCREENSHOT_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / name)
    return path


def upload_and_wait(page, photo: Path) -> None:
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    page.wait_for_function("() => document.getElementById('verdict').textContent.length > 0")


def test_upload_shows_verdict_overlay_and_slider_redraws(browser, server, photo_path, varied_model_path, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(server + "/")
    page.wait_for_function("() => document.getElementById('model-info').textContent.includes('varied.safetensors')")
    assert "does not replace a professional structural assessment" in page.inner_text(".note")
    scan_threshold = read_meta(varied_model_path)["scan_threshold"]
    step = f"{scan_threshold:.2f}"
    assert f"scan threshold {step}" in page.inner_text("#model-info")
    assert page.input_value("#threshold") == step

    upload_and_wait(page, photo_path)
    assert page.is_hidden("#busy") and page.is_hidden("#error")
    assert page.inner_text("#server-threshold") == step and page.inner_text("#threshold-value") == step
    # The page's first answer is the server's, at the scan threshold itself (not at the slider's step).
    with open(photo_path, "rb") as handle:
        served = httpx.post(server + "/scan", files={"photo": ("p.jpg", handle, "image/jpeg")}, timeout=120).json()
    assert served["threshold"] == pytest.approx(scan_threshold)
    assert page.locator("#regions li").count() == len(served["regions"])
    assert f"{100 * served['flagged_fraction']:.1f}% of the photo" in page.inner_text("#summary")
    # (Judged at the slider's step instead, the answer would differ: the test can tell the two apart.)
    assert page.evaluate("(t) => assess(t)", float(step))["flagged_fraction"] < served["flagged_fraction"] - 1e-6
    verdict = page.inner_text("#verdict")
    assert verdict in ("CRACK", "NO CRACK")
    assert "crack" in page.get_attribute("#verdict", "class") or "clear" in page.get_attribute("#verdict", "class")
    width, height, first = page.evaluate(CANVAS_DIGEST)
    assert width > 0 and abs(width / height - 4 / 3) < 0.02
    assert page.get_attribute("#download", "href").startswith("data:image/jpeg;base64,")
    regions_at_start = page.locator("#regions li").count()
    assert page.inner_text("#region-count") == f"({regions_at_start})"
    keep_screenshot(page, tmp_path, "page-desktop.png")

    # Slider to 0: every cell flagged, one region covering the photo; to 1: nothing flagged.
    slider = page.locator("#threshold")
    slider.focus()
    page.keyboard.press("Home")
    assert page.inner_text("#threshold-value") == "0.00"
    assert page.inner_text("#verdict") == "CRACK" and page.locator("#regions li").count() == 1
    assert "100.0% of the photo" in page.inner_text("#summary")
    _, _, at_zero = page.evaluate(CANVAS_DIGEST)
    page.keyboard.press("End")
    assert page.inner_text("#verdict") == "NO CRACK" and page.locator("#regions li").count() == 0
    _, _, at_one = page.evaluate(CANVAS_DIGEST)
    # (The first map may equal one of the two: verification can leave nothing flagged at the threshold.)
    assert at_zero != at_one and len({first, at_zero, at_one}) >= 2, "the canvas was not redrawn when the slider moved"

    # Somewhere in between, the map splits into several regions: the client-side grouping at work.
    counts = {}
    for value in np.linspace(0.2, 0.8, 13):
        slider.fill(f"{value:.2f}")
        counts[page.locator("#regions li").count()] = f"{value:.2f}"
    assert max(counts) > 1, counts
    slider.fill(counts[max(counts)])
    assert page.inner_text("#region-count") == f"({max(counts)})"
    keep_screenshot(page, tmp_path, "page-desktop-threshold.png")

    # The page's regions at a threshold are the server's regions at that threshold.
    for threshold in (0.45, 0.6, 0.65):
        with open(photo_path, "rb") as handle:
            served = httpx.post(server + "/scan", files={"photo": ("p.jpg", handle, "image/jpeg")},
                                data={"threshold": str(threshold)}, timeout=120).json()
        mine = page.evaluate("(t) => assess(t)", threshold)
        assert mine["is_crack"] == served["is_crack"]
        assert mine["flagged_fraction"] == pytest.approx(served["flagged_fraction"], abs=1e-4)
        assert [(r["box"], r["cells"]) for r in mine["regions"]] == [(r["box"], r["cells"]) for r in served["regions"]]
        for a, b in zip(mine["regions"], served["regions"]):
            assert a["max_probability"] == pytest.approx(b["max_probability"], abs=1e-5)
            assert a["area_fraction"] == pytest.approx(b["area_fraction"], abs=1e-4)
    assert not errors, errors
    page.close()


def test_phone_width_layout(browser, server, photo_path, tmp_path):
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                  is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(server + "/")
    upload_and_wait(page, photo_path)
    # Nothing wider than the screen: no sideways scrolling on a phone.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    canvas_box = page.locator("#overlay").bounding_box()
    assert canvas_box["width"] <= 390 and canvas_box["width"] > 300
    keep_screenshot(page, tmp_path, "page-phone.png")
    context.close()


def test_server_errors_are_shown_in_the_page(browser, server, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("Inspection notes, not a photo.\n" * 10)
    page = browser.new_page()
    page.goto(server + "/")
    page.set_input_files("#file", str(notes))
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "notes.jpg: not an image" in page.inner_text("#error")
    assert page.is_hidden("#result") and page.is_hidden("#busy")
    page.close()


def set_patch_size(page, value: str, *, announce: bool) -> None:
    """Type a patch size; ``announce`` commits it as leaving the field does (a change event)."""
    page.evaluate("([v, announce]) => { const f = document.getElementById('patch-size'); f.value = v; "
                  "if (announce) f.dispatchEvent(new Event('change')); }", [value, announce])


def test_the_latest_upload_wins_and_a_new_patch_size_scans_again(browser, server, photo_path, tmp_path):
    small = tmp_path / "small-photo.jpg"
    concrete_photo(np.random.default_rng(9), 480, 360).save(small, quality=90)
    page = browser.new_page()
    page.goto(server + "/")
    page.wait_for_function("() => document.getElementById('model-info').textContent.includes('varied')")

    # A patch size the server refuses, then a good one: the same photo is scanned again without choosing it again.
    set_patch_size(page, "31", announce=True)
    page.set_input_files("#file", str(photo_path))
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "patch_size" in page.inner_text("#error")
    set_patch_size(page, "227", announce=True)
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    assert page.is_hidden("#error") and "wall-photo" in page.get_attribute("#download", "download")

    # A slow scan (small patches: 4x the pixels) sent first and a quick one after it: the quick one is shown,
    # however late the slow answer comes.
    set_patch_size(page, "40", announce=False)
    page.set_input_files("#file", str(photo_path))
    set_patch_size(page, "227", announce=False)
    page.set_input_files("#file", str(small))
    page.wait_for_function("() => (document.getElementById('download').getAttribute('download') || '')"
                           ".includes('small-photo')", timeout=120_000)
    page.wait_for_load_state("networkidle", timeout=120_000)  # the slow answer has come back too
    page.wait_for_timeout(300)
    assert "small-photo" in page.get_attribute("#download", "download")
    assert page.is_hidden("#busy")
    # Probabilities are shown rounded down, as the server's overlay shows them.
    assert page.evaluate("() => [down2(0.999997), down2(0.876), down2(0.5)]") == ["0.99", "0.87", "0.50"]
    page.close()


def test_a_file_over_the_limit_during_a_scan_and_quick_patch_size_steps(browser, tiny_model_path, photo_path,
                                                                        tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (3 * 1024 * 1024))  # never sent: the page checks the size first
    with live_server(create_app(str(tiny_model_path), max_upload_bytes=2 * 1024 * 1024)) as url:
        page = browser.new_page()
        scans: list[str] = []
        page.on("request", lambda r: scans.append(r.url) if r.method == "POST" else None)
        page.goto(url + "/")
        page.wait_for_function("() => document.getElementById('model-info').textContent.includes('tiny')")
        set_patch_size(page, "40", announce=False)
        page.set_input_files("#file", str(photo_path))  # a slow scan ...
        page.wait_for_selector("#busy:not([hidden])")
        page.set_input_files("#file", str(big))  # ... and, while it runs, a file over the limit
        page.wait_for_selector("#error:not([hidden])")
        assert "over the 2.0 MB upload limit" in page.inner_text("#error")
        page.wait_for_load_state("networkidle", timeout=120_000)
        assert page.is_hidden("#busy") and page.get_attribute("#drop", "aria-busy") is None
        assert page.is_hidden("#result")  # the slow scan's answer is not shown under the later error

        # Five steps of the patch size's arrows scan the photo once, after the last step.
        set_patch_size(page, "227", announce=True)
        page.set_input_files("#file", str(photo_path))
        page.wait_for_selector("#result:not([hidden])", timeout=120_000)
        before = len(scans)
        for size in ("228", "229", "230", "231", "232"):
            set_patch_size(page, size, announce=True)
        page.wait_for_timeout(1500)
        page.wait_for_load_state("networkidle", timeout=120_000)
        assert len(scans) - before == 1, scans[before:]
        page.wait_for_selector("#result:not([hidden])", timeout=120_000)
        page.close()
