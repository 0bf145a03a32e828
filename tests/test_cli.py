"""The command line: the whole pipeline on data_samples, and one-line errors for a user's mistakes."""
import csv
import subprocess
import sys

import pytest

from tests.conftest import REPO, SAMPLES


def run(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.mark.parametrize("args,needle", [
    (["crop", "/nonexistent/raw", "--out", "/tmp/x"], "is not a folder"),
    (["train", "/nonexistent/crops", "--out", "/tmp/x"], "has no manifest.csv"),
    (["train", SAMPLES / "train", "--out", "/tmp/x", "--optimizer", "rmsprop"], "--optimizer 'rmsprop'"),
    (["predict", "/nonexistent.pt", SAMPLES / "eval"], "no such checkpoint"),
])
def test_user_mistakes_are_one_line_and_exit_1(args, needle):
    res = run(*args)
    assert res.returncode == 1
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error:")


@pytest.mark.slow
def test_crop_train_predict_on_data_samples(tmp_path):
    crops, eval_crops, runs = tmp_path / "c", tmp_path / "e", tmp_path / "r"
    res = run("crop", SAMPLES / "train", "--out", crops)
    assert res.returncode == 0, res.stderr
    with open(crops / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 56 and all(r["status"] in ("ok", "relaxed", "person_box") for r in rows)
    assert {r["label"] for r in rows if r["image_id"].startswith("000002_female_Asian_76/")} == {"5", "11", "17"}
    again = run("crop", SAMPLES / "train", "--out", crops)
    assert "detected this run │      0" in again.stderr  # nothing re-detected
    res = run("train", crops, "--out", runs, "--epochs", "1", "--img-size", "64", "--workers", "0")
    assert res.returncode == 0, res.stderr
    res = run("predict", runs / "best.pt", SAMPLES / "eval", "--out", tmp_path / "sub.csv", "--crops", eval_crops,
              "--tta", "2", "--workers", "0")
    assert res.returncode == 0, res.stderr
    with open(tmp_path / "sub.csv") as f, open(SAMPLES / "eval" / "info.csv") as g:
        assert [r["ImageID"] for r in csv.DictReader(f)] == [r["ImageID"] for r in csv.DictReader(g)]
    res = run("evaluate", runs / "best.pt", crops, "--workers", "0")
    assert res.returncode == 0 and "macro F1" in res.stderr
