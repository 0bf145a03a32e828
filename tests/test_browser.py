"""The report and compare pages in a real browser (headless Chromium through chromedriver): every image
loads, no console error, and a screenshot of each page is saved. Skipped, saying why, where Chromium
is not installed (Debian: apt-get install chromium chromium-driver; the Python side: selenium, in the
test extra)."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from classify.study.compare import compare
from classify.study.report import report
from classify.training.train import TrainConfig, fit
from preprocess import CropConfig, crop_dataset
from tests.conftest import SAMPLES, make_person
from tests.test_deploy import sample_model, server  # noqa: F401 (fixtures)

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


def test_the_serve_page_shows_a_photos_box_and_class(sample_model, server, tmp_path):
    """The page of `maskcls serve` in the browser: choose a sample photo, the box is drawn on it, its
    crop and class appear (the class the API gives), no console error; screenshot."""
    pytest.importorskip("fastapi")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, want = server
    photo = sorted((SAMPLES / "eval" / "images").iterdir())[0]
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        driver.get(url + "/")
        driver.find_element(By.ID, "files").send_keys(str(photo))
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result h3.class"))
        title = driver.find_element(By.CSS_SELECTOR, ".result h3.class").text
        y = int(want.labels[want.image_ids.index(photo.name)])
        assert f"(class {y})" in title
        assert "has not learned" in driver.find_element(By.CSS_SELECTOR, "#status .caution").text  # as the API says
        WebDriverWait(driver, 10).until(lambda d: d.execute_script(
            "const c = document.querySelector('.result canvas.photo'); return c && c.width > 0"))
        red = driver.execute_script(  # the face box is drawn: red pixels on the photo canvas
            "const c = document.querySelector('.result canvas.photo'); const d = c.getContext('2d')"
            ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
            "for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i+1] < 100 && d[i+2] < 100) n++; return n;")
        assert red > 50
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        SHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SHOTS / "serve.png"))
        # then a photo the server refuses: its error alone, the first photo's answer gone (issue 29)
        bad = tmp_path / "broken.jpg"
        bad.write_bytes(b"this is not a photo" * 20)
        driver.find_element(By.ID, "files").send_keys(str(bad))
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#status .err"))
        assert "broken.jpg" in driver.find_element(By.CSS_SELECTOR, "#status .err").text
        assert driver.find_elements(By.CSS_SELECTOR, ".result") == []
        # and a good photo after it: its answer, the error gone
        driver.find_element(By.ID, "files").send_keys(str(photo))
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result h3.class"))
        assert driver.find_elements(By.CSS_SELECTOR, "#status .err") == []
        assert len(driver.find_elements(By.CSS_SELECTOR, ".result")) == 1
    finally:
        driver.quit()
