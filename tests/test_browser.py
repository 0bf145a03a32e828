"""The report and compare pages in a real browser (headless Chromium through chromedriver): every image
loads, no console error, and a screenshot of each page is saved. Skipped, saying why, where Chromium
is not installed (Debian: apt-get install chromium chromium-driver; the Python side: selenium, in the
test extra)."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from classify.compare import compare
from classify.report import report
from classify.train import TrainConfig, fit
from preprocess import CropConfig, crop_dataset
from tests.conftest import make_person

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (CHROMIUM and DRIVER and importlib.util.find_spec("selenium")),
    reason="needs Chromium and chromedriver (apt-get install chromium chromium-driver) and selenium (pip)")]
SHOTS = Path("/tmp/maskcls-screenshots")  # where a person looks at them after a run


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    from tests.conftest import FakeDetector

    w = tmp_path_factory.mktemp("pages")
    for p in range(12):
        make_person(w / "raw" / "images", f"{p:06d}_{'male' if p % 2 else 'female'}_Asian_{[22, 45, 70][p % 3]}",
                    levels={"normal": 0} if p == 3 else ({"mask2": 150} if p == 5 else None))
    crop_dataset(w / "raw", w / "crops", CropConfig(size=48), detector=FakeDetector())
    common = dict(crops=str(w / "crops"), img_size=32, workers=0, weights="none", device="cpu", val_ratio=0.34)
    fit(TrainConfig(out=str(w / "run_a"), epochs=2, **common), warn=lambda m: None)
    fit(TrainConfig(out=str(w / "run_b"), epochs=2, lr=3e-3, **common), warn=lambda m: None)
    rep = report(w / "crops", w / "report", run=w / "run_a")
    _, _, cmp = compare([w / "run_a", w / "run_b"], w / "compare")
    return {"report": rep, "compare": cmp}


def _render(page: Path, shot: Path, profile: Path) -> tuple[list[str], list[str]]:
    """(images that did not load, console errors) of `page`; saves a full-page screenshot to `shot`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1300,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        driver.get(page.as_uri())
        driver.execute_async_script(  # every image settled (loaded or failed)
            "const done = arguments[arguments.length - 1];"
            "Promise.all(Array.from(document.images).map(i => i.complete ? 0 :"
            " new Promise(r => { i.onload = r; i.onerror = r; }))).then(() => done());")
        broken = driver.execute_script(
            "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1300, min(max(height, 600), 16000))
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
        return broken, errors
    finally:
        driver.quit()


@pytest.mark.parametrize("name", ["report", "compare"])
def test_every_image_loads_without_a_console_error(pages, name, tmp_path):
    broken, errors = _render(pages[name], SHOTS / f"{name}.png", tmp_path / "profile")
    assert broken == [] and errors == []
    assert (SHOTS / f"{name}.png").stat().st_size > 20_000  # a page was drawn, not a blank


def test_the_check_sees_a_missing_image(pages, tmp_path):
    """The same check on a copy of the report with one figure deleted: it must notice."""
    copy = tmp_path / "report"
    shutil.copytree(pages["report"].parent, copy)
    (copy / "curves.png").unlink()
    broken, errors = _render(copy / "index.html", tmp_path / "shot.png", tmp_path / "profile")
    assert [Path(b).name for b in broken] == ["curves.png"]
    assert any("curves.png" in e for e in errors)
