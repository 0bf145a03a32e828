"""A newcomer's first hour (issue 21): text read as markup, another data set's crops replaced, k-fold
on too few people, reports of unlabelled crops, compare's cells and curves, figures that hide their
labels, help that hides defaults, Ctrl-C. The one-line user mistakes are rows of test_mistakes.py."""
from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time

import pytest

from classify.training.config import TrainConfig
from classify.training.train import fit
from tests.conftest import REPO, FakeDetector, make_crops, make_person

FAST = dict(model="resnet18", img_size=32, batch_size=32, lr=1e-3, workers=0, weights="none", device="cpu",
            preset="none", val_ratio=0.25)


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _cli(*args, timeout=300, columns=None):
    import os

    env = {**os.environ, "COLUMNS": str(columns)} if columns else None
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def test_paths_and_library_text_are_printed_as_they_are_never_as_markup(tmp_path):
    """`x[/]` was a MarkupError traceback and `br[red]x` printed as `brx`; the TensorBoard hint lost
    its `[tensorboard]`."""
    for name in ("x[/]", "br[red]x"):
        folder = tmp_path / name
        folder.mkdir(parents=True)
        res = _cli("crop", folder, "--out", tmp_path / "c")
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-1500:]
        assert str(folder) in " ".join(res.stderr.split()), res.stderr
    from cli_commands import common as cli

    out = []
    cli.console.print = lambda text, **k: out.append(text)  # what rich would be asked to render
    try:
        cli.warning("TensorBoard logs are off: pip install 'maskcls[tensorboard]'")
    finally:
        del cli.console.print
    from rich.console import Console

    rendered = Console(width=200, record=True, file=open("/dev/null", "w"))
    rendered.print(out[0])
    assert "pip install 'maskcls[tensorboard]'" in rendered.export_text()


def test_a_crop_over_another_raw_folders_crops_is_refused_unless_overwrite(tmp_path):
    from classify.errors import USER_ERRORS
    from preprocess import CropConfig, crop_dataset
    from preprocess.manifest import read_manifest, read_meta

    for raw, person in (("a", "000001_female_Asian_45"), ("b", "000002_male_Asian_30")):
        make_person(tmp_path / raw / "images", person)
    crop_dataset(tmp_path / "a", tmp_path / "c", CropConfig(size=48), detector=FakeDetector())
    before = (tmp_path / "c" / "manifest.csv").read_bytes()
    with pytest.raises(USER_ERRORS, match=r"holds the crops of .*/a, not of .*/b: give another --out, or --overwrite"):
        crop_dataset(tmp_path / "b", tmp_path / "c", CropConfig(size=48), detector=FakeDetector())
    assert (tmp_path / "c" / "manifest.csv").read_bytes() == before
    again = crop_dataset(tmp_path / "a", tmp_path / "c", CropConfig(size=48), detector=FakeDetector())
    assert again.detected == 0  # its own RAW: the cache is intact
    crop_dataset(tmp_path / "b", tmp_path / "c", CropConfig(size=48), detector=FakeDetector(), overwrite=True)
    assert read_meta(tmp_path / "c")["raw"].endswith("/b")
    assert {r["person_id"] for r in read_manifest(tmp_path / "c")} == {"000002"}


def test_more_folds_than_people_is_refused_before_any_fold_trains(tmp_path):
    from classify.errors import ConfigError

    crops = make_crops(tmp_path / "c", people=4)
    with pytest.raises(ConfigError, match="--folds 5: more folds than the 4 people"):
        fit(TrainConfig(crops=str(crops), out=str(tmp_path / "r"), **FAST, folds=5, fold="all"), warn=lambda m: None)
    assert not (tmp_path / "r").exists()


def test_a_report_of_unlabelled_crops_draws_what_the_data_has_and_says_what_needs_labels(tmp_path):
    from classify.study.report import report
    from preprocess import CropConfig, crop_dataset

    ev = tmp_path / "eval"
    (ev / "images").mkdir(parents=True)
    from tests.conftest import photo, save_rgb

    lines = ["ImageID,ans"]
    for k in range(5):
        save_rgb(ev / "images" / f"{k:03d}.jpg", photo(seed=k))
        lines.append(f"{k:03d}.jpg,-1")
    (ev / "info.csv").write_text("\n".join(lines) + "\n")
    crop_dataset(ev, tmp_path / "c", CropConfig(size=48), detector=FakeDetector())
    index = report(tmp_path / "c", tmp_path / "rep").read_text()
    for name in ("class_counts.png", "task_counts.png", "ages.png", "crops_grid.png"):
        assert not (tmp_path / "rep" / name).exists(), name
    assert "has no labels" in index and "sample_grid.png" in index
    assert sorted(r["image_id"] for r in _csv(tmp_path / "rep" / "sample_grid.csv")) == [f"{k:03d}.jpg" for k in range(5)]


def test_compare_writes_values_as_people_write_them_and_compares_what_was_used(tmp_path):
    """No JSON quotes; `backbone` differs only between attention models; `weights` is what each run
    used (auto that resolved to none equals none); a k-fold run's curve is the folds' mean with a band."""
    from classify.study.compare import compare

    crops = make_crops(tmp_path / "c", people=12)
    fit(TrainConfig(crops=str(crops), out=str(tmp_path / "a"), **FAST, epochs=1), warn=lambda m: None)
    fit(TrainConfig(crops=str(crops), out=str(tmp_path / "b"), **(FAST | {"lr": 2e-3}), epochs=1,
                    backbone="mobilenet_v2"), warn=lambda m: None)  # a backbone resnet18 does not use
    fit(TrainConfig(crops=str(crops), out=str(tmp_path / "k"), **FAST, epochs=2, folds=2, fold="all"),
        warn=lambda m: None)
    _, keys, index = compare([tmp_path / "a", tmp_path / "b", tmp_path / "k"], tmp_path / "cmp")
    assert "backbone" not in keys and "lr" in keys
    from classify.study.compare import effective_config

    used = effective_config({"weights": "auto", "weights_resolved": "none", "model": "resnet18", "backbone": "x"})
    assert used == effective_config({"weights": "none", "weights_resolved": "none", "model": "resnet18"})
    assert effective_config({"model": "attention", "backbone": "x"})["backbone"] == "x"
    rows = {r["run"]: r for r in _csv(tmp_path / "cmp" / "compare.csv")}
    assert rows["b"]["lr"] == "0.002" and '"' not in (tmp_path / "cmp" / "compare.csv").read_text()
    assert "&quot;" not in index.read_text()
    curve = [r for r in _csv(tmp_path / "cmp" / "curves.csv") if r["run"] == "k"]
    fold_f1 = [[float(r["val_f1"]) for r in _csv(tmp_path / "k" / f"fold{i}" / "metrics.csv")] for i in range(2)]
    import numpy as np

    assert [float(r["val_f1"]) for r in curve] == pytest.approx(np.mean(fold_f1, axis=0).tolist(), abs=1e-6)
    assert [float(r["val_f1_std"]) for r in curve] == pytest.approx(np.std(fold_f1, axis=0).tolist(), abs=1e-6)
    res = subprocess.run([sys.executable, str(REPO / "cli.py"), "compare", str(tmp_path / "a"), str(tmp_path / "b"),
                          "--out", str(tmp_path / "cmp2")], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**__import__("os").environ, "COLUMNS": "80"})
    assert res.returncode == 0 and "…" not in res.stderr, res.stderr  # cells wrap at 80 columns, never cut


def test_the_crop_grid_names_each_tiles_person_and_has_no_empty_columns(tmp_path):
    from classify.study.report import report

    from PIL import Image

    crops = make_crops(tmp_path / "c", people=2)  # at most 5 photos in a class (2 people x 1..5 mask photos)
    report(crops, tmp_path / "rep", per_class=12)
    grid = _csv(tmp_path / "rep" / "crops_grid.csv")
    assert {r["column"] for r in grid} == {"0", "1", "2", "3", "4"}
    narrow = Image.open(tmp_path / "rep" / "crops_grid.png").size[0]
    report(make_crops(tmp_path / "c12", people=12), tmp_path / "rep12", per_class=12)
    assert narrow < Image.open(tmp_path / "rep12" / "crops_grid.png").size[0]  # 5 columns drawn, not 12
    from classify.study.report import _person_label
    assert _person_label("000123_female_Asian_45/mask1") == "000123"


def test_help_shows_every_default_and_no_type_for_flags():
    res = _cli("train", "--help", timeout=60, columns=400)  # one line per option: words are not cut by the box
    text = " ".join(res.stdout.split())
    for words in ("(default: resnet18)", "(default: adamw)", "(default: cosine)", "(default: wce)", "(default: base)"):
        assert words in text, words
    assert " ." not in text.replace(" ...", "")
    flags = [line for line in res.stdout.splitlines() if "--resume" in line or "--freeze-backbone" in line]
    assert flags and not any("<bool>" in line for line in flags)
    ev = " ".join(_cli("evaluate", "--help", timeout=60, columns=400).stdout.split())
    assert "Images per forward pass" in ev and "DataLoader worker processes" in ev


def test_ctrl_c_during_crop_says_it_was_interrupted_and_that_a_rerun_resumes(tmp_path):
    """The real CLI in its own interpreter, interrupted for certain mid-crop: its second chunk's detection
    marks that it has begun and waits (it was a race with the clock: on a busy machine the crop had finished
    before the signal came)."""
    for p in range(30):
        make_person(tmp_path / "raw" / "images", f"{p:06d}_male_Asian_30")
    marker = tmp_path / "mid-crop"
    # SIGINT as a terminal gives it: a job started with `&` by a non-interactive shell (a script, some CI runners)
    # inherits SIGINT ignored, and the crop then never heard the signal (this test hung in such a run).
    code = ("import signal, sys, time; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "sys.path.insert(0, sys.argv[1]); import preprocess.crop as C\n"
            "real, calls, marker = C.detect_and_choose, [], sys.argv[2]\n"
            "def held(*a, **k):\n"
            "    calls.append(1)\n"
            "    if len(calls) == 2:\n"
            "        open(marker, 'w').close()\n"
            "        time.sleep(600)  # mid-crop until the signal\n"
            "    return real(*a, **k)\n"
            "C.detect_and_choose = held\n"
            "sys.argv = ['maskcls'] + sys.argv[3:]\n"
            "import cli; cli.app()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(marker), "crop", str(tmp_path / "raw"),
                             "--out", str(tmp_path / "c"), "--device", "cpu", "--batch-size", "8", "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 180
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate(timeout=60)[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "interrupted: `maskcls crop` stopped" in " ".join(err.split()) and "rerun the same command" in err


def test_version_and_every_help_in_an_80_column_terminal_cuts_no_word():
    from importlib.metadata import version

    assert _cli("--version", timeout=60).stdout.strip() == f"maskcls {version('maskcls')}"
    for command in ("crop", "train", "predict", "pseudo-label", "evaluate", "report", "export", "serve", "explain",
                    "tune", "compare", "audit"):
        res = _cli(command, "--help", timeout=60, columns=80)
        assert res.returncode == 0 and "…" not in res.stdout, (command, [x for x in res.stdout.splitlines() if "…" in x])
    train = " ".join(_cli("train", "--help", timeout=60, columns=400).stdout.split())
    assert "(required, unless --config names out)" in train
