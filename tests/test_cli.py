"""The command line: the whole pipeline on data_samples, and one-line errors for a user's mistakes."""
import csv

import pytest

from tests.conftest import SAMPLES


@pytest.fixture
def run(cli_run):
    return cli_run


@pytest.mark.parametrize("args,needle", [
    (["crop", "/nonexistent/raw", "--out", "/tmp/x"], "is not a folder"),
    (["train", "/nonexistent/crops", "--out", "/tmp/x"], "has no manifest.csv"),
    (["train", SAMPLES / "train", "--out", "/tmp/x", "--optimizer", "rmsprop"], "--optimizer 'rmsprop'"),
    (["predict", "/nonexistent.pt", SAMPLES / "eval"], "no such checkpoint"),
    (["train", SAMPLES / "train", "--out", "/tmp/x", "--workers", "-1"], "--workers -1: must be >= 0"),
    (["train", SAMPLES / "train", "--out", "/tmp/x", "--lr", "-1"], "--lr -1.0: must be > 0"),
    (["train", SAMPLES / "train", "--out", "/tmp/x", "--old", "20"], "--old 20: must be in 31..120"),
    (["train", SAMPLES / "train", "--out", "/tmp/x", "--fold", "all"], "--fold all needs --folds K"),
    (["train", SAMPLES / "train", "--out", "/tmp/x", "--amp", "fp8"], "--amp 'fp8': choose one of auto, bf16, fp16, off"),
    (["train", SAMPLES / "train", "--out", "/tmp/x", "--model", "resnet999"], "unknown model 'resnet999'"),
    (["train", SAMPLES / "train", "--out", "/tmp/x", "--model", "attention", "--backbone", "vgg0"], "unknown backbone 'vgg0'"),
])
def test_user_mistakes_are_one_line_and_exit_1(run, args, needle):
    res = run(*args)
    assert res.returncode == 1
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error:")


@pytest.mark.slow
def test_crop_train_predict_on_data_samples(run, tmp_path):
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


@pytest.fixture
def synthetic_crops(tmp_path):
    from tests.conftest import make_crops

    return make_crops(tmp_path / "crops", people=12)


def test_weights_file_and_existing_run_mistakes_are_one_line(run, synthetic_crops, tmp_path):
    (tmp_path / "w.json").write_text('{"a": 1}')
    res = run("train", synthetic_crops, "--out", tmp_path / "r", "--weights", tmp_path / "w.json", "--workers", "0",
              "--img-size", "32")
    assert res.returncode == 1 and "Traceback" not in res.stderr and "weights_only" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"error: --weights {tmp_path / 'w.json'} is text (JSON?), not a "
                                               "PyTorch file"]
    ok = run("train", synthetic_crops, "--out", tmp_path / "r", "--epochs", "1", "--workers", "0", "--img-size", "32",
             "--weights", "none")
    assert ok.returncode == 0, ok.stderr
    assert "trained on" in ok.stderr and "left out 0" in ok.stderr
    best = (tmp_path / "r" / "best.pt").read_bytes()
    again = run("train", synthetic_crops, "--out", tmp_path / "r", "--epochs", "1", "--workers", "0", "--weights", "none")
    assert again.returncode == 1 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "r" / "best.pt").read_bytes() == best


def test_kfold_in_one_command_then_predict_the_run_folder(run, synthetic_crops, tmp_path):
    res = run("train", synthetic_crops, "--out", tmp_path / "kf", "--folds", "2", "--fold", "all", "--epochs", "1",
              "--workers", "0", "--img-size", "32", "--weights", "none")
    assert res.returncode == 0, res.stderr
    assert "out-of-fold" in res.stderr and (tmp_path / "kf" / "fold1" / "best.pt").is_file()
    res = run("predict", tmp_path / "kf", synthetic_crops, "--out", tmp_path / "sub.csv", "--workers", "0",
              "--vote", "hard")
    assert res.returncode == 0, res.stderr
    with open(tmp_path / "sub.csv") as f:
        assert len(list(csv.DictReader(f))) == 12 * 7
