"""Interrupted runs, full disks and untrusted files: nothing is lost, nothing runs code."""
import csv
import errno
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from classify.checkpoint import load_checkpoint
from preprocess import CropConfig, crop_dataset
from preprocess.imageio import read_crop
from preprocess.layouts import LayoutError
from preprocess.manifest import read_manifest
from tests.conftest import REPO, make_crops, make_person
from tests.helpers.train_run import FAST


def _manifest_rows(out):
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_crop_killed_at_random_points_finishes_with_exactly_one_row_per_photo(tmp_path, fake_detector):
    raw = tmp_path / "raw"
    for p in range(10):
        make_person(raw / "images", f"{p:06d}_{'male' if p % 2 else 'female'}_Asian_{20 + 5 * p}",
                    levels={"mask2": 150} if p % 3 == 0 else None)
    reference = tmp_path / "reference"
    crop_dataset(raw, reference, CropConfig(size=48, batch_size=7), detector=fake_detector)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tests" / "helpers" / "crop_slowly.py"), str(raw), str(out)]
    rnd = random.Random(7)
    journal = out / ".journal.jsonl"

    def units_done():
        return len(journal.read_bytes().splitlines()) if journal.is_file() else 0

    kills = 0
    for _ in range(4):  # each run finishes one or two more people (of 10), then dies at a random moment
        target = units_done() + rnd.randint(1, 2)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while proc.poll() is None and units_done() < target and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rnd.uniform(0.0, 0.2))  # a person takes ~0.2 s: the kill lands anywhere in the next one
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 3
    subprocess.run(cmd, check=True, timeout=120)
    rows = _manifest_rows(out)
    assert len(rows) == 70 and len({r["image_id"] for r in rows}) == 70
    ref = _manifest_rows(reference)
    assert [(r["image_id"], r["status"], r["x1"], r["label"]) for r in rows] == \
           [(r["image_id"], r["status"], r["x1"], r["label"]) for r in ref]
    for r in rows:
        assert read_crop(out / r["crop"]).shape == (48, 48, 3)  # every crop complete and decodable
    assert not list(out.rglob(".*.tmp*"))
    packed = np.load(out / "crops.npy")
    assert packed.shape == (70, 48, 48, 3)


def test_train_killed_mid_epoch_resumes_to_the_same_metrics(tmp_path, cli_run):
    crops = make_crops(tmp_path / "crops", people=24)
    helper = [sys.executable, str(REPO / "tests" / "helpers" / "train_run.py"), str(crops)]
    subprocess.run(helper + [str(tmp_path / "full"), "3"], check=True, timeout=300)
    run = tmp_path / "cut"
    proc = subprocess.Popen(helper + [str(run), "3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.csv").is_file() and len((run / "metrics.csv").read_text().splitlines()) == 2:
            break  # epoch 1 saved: the kill lands inside epoch 2
        time.sleep(0.05)
    time.sleep(0.15)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(run / "last.pt")["epoch"] < 2
    res = cli_run("train", crops, "--out", run, "--resume", "--workers", "0", timeout=300)
    assert res.returncode == 0, res.stderr
    strip = lambda p: [",".join(v for k, v in zip(rows[0].split(","), line.split(",")) if k != "seconds")
                       for rows in [p.read_text().splitlines()] for line in rows]
    assert strip(run / "metrics.csv") == strip(tmp_path / "full" / "metrics.csv")


def test_disk_full_during_crop_keeps_the_previous_manifest(raw_train, tmp_path, fake_detector, monkeypatch):
    out = tmp_path / "c"
    crop_dataset(raw_train, out, CropConfig(size=48), detector=fake_detector)
    before = (out / "manifest.csv").read_bytes()
    import preprocess.crop as C
    calls = {"n": 0}
    real = C.atomic_write_bytes

    def full_after_5(path, data):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(C, "atomic_write_bytes", full_after_5)
    with pytest.raises(OSError) as e:
        crop_dataset(raw_train, out, CropConfig(size=48, margin=0.5), detector=fake_detector)
    assert e.value.errno == errno.ENOSPC
    assert (out / "manifest.csv").read_bytes() == before
    for r in read_manifest(out):
        assert read_crop(out / r["crop"]).shape == (48, 48, 3)


def test_disk_full_is_one_line_from_the_cli(raw_train, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import cli
    import preprocess.crop as C

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(C, "atomic_write_bytes", full)
    monkeypatch.setattr(C, "crop_dataset", C.crop_dataset)
    res = CliRunner().invoke(cli.app, ["crop", str(raw_train), "--out", str(tmp_path / "c"), "--device", "cpu"])
    assert res.exit_code == 1
    assert "No space left on device" in res.output and "Traceback" not in res.output


def test_disk_full_while_saving_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    from classify import checkpoint as CK
    from classify.training.train import TrainConfig, fit

    crops = make_crops(tmp_path / "crops", people=12)
    real = CK.atomic_write_bytes
    saves = {"n": 0}

    def full_on_third_save(path, data):  # epoch 1 writes best.pt and last.pt; epoch 2's first save fails
        saves["n"] += 1
        if saves["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(CK, "atomic_write_bytes", full_on_third_save)
    with pytest.raises(OSError):
        fit(TrainConfig(crops=str(crops), out=str(tmp_path / "r"), epochs=3, **(FAST | {"batch_size": 32})),
            warn=lambda m: None)
    last = load_checkpoint(tmp_path / "r" / "last.pt")
    assert last["epoch"] == 0 and "optimizer" in last
    assert load_checkpoint(tmp_path / "r" / "best.pt")["epoch"] == 0
    assert not list((tmp_path / "r").glob(".*.tmp"))


def test_manifest_paths_cannot_escape_the_crops_folder(tmp_path):
    crops = make_crops(tmp_path / "c", people=2)
    text = (crops / "manifest.csv").read_text()
    (crops / "manifest.csv").write_text(text.replace("crops/0000/mask1.jpg", "../../etc/passwd", 1))
    with pytest.raises(LayoutError, match="must be relative"):
        read_manifest(crops)
