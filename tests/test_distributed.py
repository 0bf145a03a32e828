"""torchrun on the CPU with gloo: two processes give what one process gives."""
import csv
import subprocess
import sys

import numpy as np
import pytest

from preprocess import CropConfig, crop_dataset
from tests.conftest import REPO, SAMPLES, make_crops

pytestmark = pytest.mark.slow


def torchrun(*args, n=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           str(REPO / "cli.py"), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _val(run):
    with open(run / "val_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    return [r["image_id"] for r in rows], np.array([[float(r[f"p{k}"]) for k in range(18)] for r in rows])


def test_two_processes_train_like_one_process_with_the_same_global_batch(tmp_path):
    """1 process x batch 16 vs 2 processes x batch 8: the same global batches, gradients averaged by DDP,
    the loss's task weights averaged too, validation gathered from both ranks. The backbone is frozen
    and dropout off because gloo has no SyncBatchNorm and dropout masks depend on the batch split.
    (112 training photos: divisible by the world size, so no sample is padded in.)"""
    from classify.training.train import TrainConfig, fit

    crops = make_crops(tmp_path / "crops", people=20)
    common = dict(epochs=2, img_size=32, workers=0, freeze_backbone=True, weights="none", model="attention",
                  dropout=0.0, device="cpu")
    one = fit(TrainConfig(crops=str(crops), out=str(tmp_path / "one"), batch_size=16, **common), warn=lambda m: None)
    torchrun("train", crops, "--out", tmp_path / "two", "--batch-size", "8", "--epochs", "2", "--img-size", "32",
             "--workers", "0", "--freeze-backbone", "--weights", "none", "--model", "attention", "--dropout", "0")
    ids1, p1 = _val(tmp_path / "one")
    ids2, p2 = _val(tmp_path / "two")
    assert one["train_photos"] == 112 and ids1 == ids2
    assert np.abs(p1 - p2).max() < 1e-4
    assert not np.allclose(p1, p1.mean(0), atol=1e-3)  # it did learn something per photo
    with open(tmp_path / "two" / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    assert [m["epoch"] for m in metrics] == ["1", "2"]  # one writer: no duplicated rows
    import json
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2


def test_two_process_crop_writes_the_one_process_manifest(tmp_path):
    crop_dataset(SAMPLES / "train", tmp_path / "one", CropConfig(device="cpu"))
    torchrun("crop", SAMPLES / "train", "--out", tmp_path / "two", "--device", "cpu")
    assert (tmp_path / "one" / "manifest.csv").read_bytes() == (tmp_path / "two" / "manifest.csv").read_bytes()
    # the merged journal (rank 0's records read back from its file, the others' from theirs) is the one-process cache
    assert (tmp_path / "one" / ".journal.jsonl").read_bytes() == (tmp_path / "two" / ".journal.jsonl").read_bytes()
    assert np.array_equal(np.load(tmp_path / "one" / "crops.npy"), np.load(tmp_path / "two" / "crops.npy"))
    assert not list((tmp_path / "two").glob(".journal.rank*"))


def test_one_ranks_nan_stops_every_rank_instead_of_hanging(tmp_path):
    crops = make_crops(tmp_path / "crops", people=12)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "helpers" / "nan_on_one_rank.py"), str(crops), str(tmp_path / "run")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    # rank 1 saw the NaN; rank 0, whose own loss was finite, stopped at the same step by itself (without
    # the ranks agreeing it would sit in DDP's all-reduce until torchrun killed it, saying nothing)
    assert "rank 1: the loss became nan at epoch 1, step 3" in out, out[-3000:]
    assert "rank 0: the loss became non-finite in another process at epoch 1, step 3" in out, out[-3000:]


def test_kfold_under_torchrun_equals_one_process(tmp_path):
    """--folds 2 --fold all with 2 processes x batch 8 against 1 process x batch 16: the same out-of-fold
    predictions (frozen backbone, no dropout, as above), one set of fold folders, written once."""
    from classify.training.train import TrainConfig, fit

    crops = make_crops(tmp_path / "crops", people=16)
    common = dict(epochs=1, img_size=32, workers=0, freeze_backbone=True, weights="none", dropout=0.0, device="cpu",
                  folds=2, fold="all")
    fit(TrainConfig(crops=str(crops), out=str(tmp_path / "one"), batch_size=16, **common), warn=lambda m: None)
    torchrun("train", crops, "--out", tmp_path / "two", "--batch-size", "8", "--epochs", "1", "--img-size", "32",
             "--workers", "0", "--freeze-backbone", "--weights", "none", "--dropout", "0", "--folds", "2",
             "--fold", "all")

    def oof(run):
        with open(run / "oof_predictions.csv") as f:
            rows = list(csv.DictReader(f))
        return [r["image_id"] for r in rows], np.array([[float(r[f"p{k}"]) for k in range(18)] for r in rows])

    ids1, p1 = oof(tmp_path / "one")
    ids2, p2 = oof(tmp_path / "two")
    assert ids1 == ids2 and len(ids1) == 16 * 7
    assert np.abs(p1 - p2).max() < 1e-4


def _run_torchrun(script, *args, timeout=120):
    import time

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "helpers" / script), *map(str, args)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return res, res.stdout + res.stderr, time.perf_counter() - t0


@pytest.mark.parametrize("rank", [1, 0])
def test_an_error_on_one_rank_ends_the_whole_job_within_seconds(tmp_path, rank):
    """The failing rank used to wait (2 hours) for rank 0's goodbye while rank 0 waited in DDP's
    all-reduce for it: a hang until a collective timeout. Now the failing rank leaves at once with its
    error line and torchrun ends the other."""
    crops = make_crops(tmp_path / "crops", people=12)
    res, out, secs = _run_torchrun("fail_on_rank.py", crops, tmp_path / "run", f"epoch2-rank{rank}", timeout=100)
    assert res.returncode != 0 and secs < 60, (secs, out[-3000:])
    assert f"rank {rank}: injected failure on rank {rank}" in out, out[-3000:]


def test_weights_are_resolved_on_rank_0_alone(tmp_path):
    """`auto` could mean ImageNet on one node and random init on another (each rank looked at its own
    cache): rank 0 resolves and broadcasts; the other ranks never call resolve."""
    crops = make_crops(tmp_path / "crops", people=12)
    res, out, _ = _run_torchrun("fail_on_rank.py", crops, tmp_path / "run", "resolve-elsewhere", timeout=300)
    assert res.returncode == 0, out[-3000:]
    import json
    assert json.loads((tmp_path / "run" / "config.json").read_text())["world_size"] == 2


def test_a_rank_that_plans_late_still_crops_exactly_rank_0s_plan(tmp_path):
    """A rerun where some crops are missing: rank 0 re-cuts them at once, and a rank that planned from
    the file system after that saw less work left, so some persons were cropped by no rank (and
    packing failed). Rank 0 plans and broadcasts; the late rank takes its plan."""
    from tests.conftest import make_person

    raw = tmp_path / "raw"
    for p in range(8):
        make_person(raw / "images", f"{p:06d}_male_Asian_{20 + p}")
    from tests.conftest import FakeDetector

    crop_dataset(raw, tmp_path / "one", CropConfig(size=48, batch_size=7), detector=FakeDetector())
    reference = (tmp_path / "one" / "manifest.csv").read_bytes()
    for p in range(8):
        for f in (tmp_path / "one" / "crops" / "images").glob(f"{p:06d}_*/mask1.jpg"):
            f.unlink()
    res, out, _ = _run_torchrun("crop_ranks.py", raw, tmp_path / "one", timeout=300)
    assert res.returncode == 0, out[-3000:]
    assert "rank 0: 56 rows, 0 detected" in out
    assert (tmp_path / "one" / "manifest.csv").read_bytes() == reference
    assert len(list((tmp_path / "one" / "crops").rglob("*.jpg"))) == 56
