"""`train --overwrite` replaces a run, never writes into it (issue 28): the new run is trained beside the old
one and swapped in whole, so nothing of the old run (fold folders, events, summaries) is used afterwards,
and a killed overwrite leaves the old run as it was."""
from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from classify.inference import rundir
from classify.training.config import TrainConfig
from classify.inference.predictor import predict
from classify.training.train import fit
from tests.conftest import REPO, make_crops

pytestmark = pytest.mark.slow
FAST = dict(model="resnet18", img_size=32, batch_size=16, lr=1e-3, workers=0, weights="none", device="cpu",
            preset="none", val_ratio=0.25)


def _tree(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_overwriting_a_kfold_run_with_one_model_leaves_only_the_new_run(tmp_path, cli_run):
    crops = make_crops(tmp_path / "c", people=12)
    run = tmp_path / "r"
    fit(TrainConfig(crops=str(crops), out=str(run), epochs=1, folds=3, fold="all", **FAST), warn=lambda m: None)
    assert len(rundir.fold_dirs(run)) == 3
    res = cli_run("train", crops, "--out", run, "--overwrite", "--epochs", "1", "--img-size", "32", "--workers", "0",
                  "--weights", "none", "--device", "cpu", "--preset", "none", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert rundir.fold_dirs(run) == [] and not (run / rundir.OOF_PREDICTIONS).exists()
    assert not rundir.staging(run).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c", "r"]
    assert rundir.read_config(run)["out"] == str(run) and rundir.read_config(run)["fold"] != "all"
    from classify.checkpoint import load_checkpoint

    assert load_checkpoint(run / "best.pt")["config"]["out"] == str(run)
    a = predict([run], crops, None, device="cpu", workers=0)
    b = predict([run / "best.pt"], crops, None, device="cpu", workers=0)
    assert len(a.models) == 1 and np.array_equal(a.probs, b.probs)
    # and back: a k-fold overwrite of that run into 2 folds has exactly its own 2 folds
    fit(TrainConfig(crops=str(crops), out=str(run), epochs=1, folds=2, fold="all", **FAST), overwrite=True,
        warn=lambda m: None)
    assert [f.name for f in rundir.fold_dirs(run)] == ["fold0", "fold1"] and not (run / "best.pt").exists()


def test_a_killed_overwrite_leaves_the_old_run_intact(tmp_path):
    crops = make_crops(tmp_path / "c", people=12)
    run = tmp_path / "r"
    fit(TrainConfig(crops=str(crops), out=str(run), epochs=1, **FAST), warn=lambda m: None)
    before = _tree(run)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from classify.training.train import TrainConfig, fit; "
            "fit(TrainConfig(crops=sys.argv[2], out=sys.argv[3], epochs=20, model='resnet18', img_size=32, batch_size=16,"
            " workers=0, weights='none', device='cpu', preset='none', val_ratio=0.25), overwrite=True, warn=print)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(crops), str(run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (rundir.staging(run) / rundir.BEST).is_file():
        time.sleep(0.05)
    assert proc.poll() is None, "the overwrite finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _tree(run) == before  # byte for byte: nothing of the new run got in, nothing of the old went
    fit(TrainConfig(crops=str(crops), out=str(run), epochs=1, seed=1, **FAST), overwrite=True, warn=lambda m: None)
    assert not rundir.staging(run).exists() and _tree(run) != before


def test_a_swap_killed_between_its_renames_rolls_forward_to_the_whole_new_run(tmp_path):
    """Issue 34, item 9: the old run renamed away, the new one (whole: its summary.json written) not yet in
    place. Recovery restored the old run and stranded the new one for the next --overwrite to delete; and
    until a train ran, predict on RUN failed. Now the next reader finishes the swap."""
    crops = make_crops(tmp_path / "c", people=12)
    run, new = tmp_path / "r", tmp_path / "new"
    fit(TrainConfig(crops=str(crops), out=str(run), epochs=1, **FAST), warn=lambda m: None)
    fit(TrainConfig(crops=str(crops), out=str(new), epochs=1, seed=1, **FAST), warn=lambda m: None)
    want = predict([new], crops, None, device="cpu", workers=0).probs
    run.rename(rundir.retired(run))  # swap_in's first rename, then the kill
    new.rename(rundir.staging(run))
    got = predict([run], crops, None, device="cpu", workers=0).probs  # predict on RUN: the new run
    assert np.array_equal(got, want)
    assert not rundir.retired(run).exists() and not rundir.staging(run).exists()
    # a new run that was not finished (no summary.json) is not rolled forward: the old run comes back
    old_tree = _tree(run)
    run.rename(rundir.retired(run))
    rundir.staging(run).mkdir()
    (rundir.staging(run) / "best.pt").write_bytes(b"half")
    assert "undid" in rundir.recover_swap(run) and _tree(run) == old_tree


def test_a_kfold_resume_refuses_a_finished_fold_of_another_run(tmp_path):
    from classify.errors import ConfigError

    crops = make_crops(tmp_path / "c", people=12)
    run = tmp_path / "r"
    fit(TrainConfig(crops=str(crops), out=str(run), epochs=1, folds=2, fold="all", **FAST), warn=lambda m: None)
    cfg = rundir.read_config(run / "fold1")
    rundir.write_config(run / "fold1", cfg | {"lr": 0.5})  # a fold trained with other settings
    with pytest.raises(ConfigError, match="fold1 is a finished fold of another run.*lr"):
        fit(TrainConfig(crops=str(crops), out=str(run), epochs=1, folds=2, fold="all", **FAST), resume=True,
            warn=lambda m: None)


def test_a_resume_whose_split_file_names_other_validation_people_is_refused(tmp_path):
    from classify.errors import ConfigError

    crops = make_crops(tmp_path / "c", people=12)
    run = tmp_path / "r"
    fit(TrainConfig(crops=str(crops), out=str(run), epochs=1, **FAST), warn=lambda m: None)
    split = rundir.read_split(run)
    val, train = sorted(p for p, s in split.items() if s == "val"), sorted(p for p, s in split.items() if s == "train")
    rundir.write_split(run / rundir.SPLIT, split | {val[0]: "train", train[0]: "val"})  # as an older split would
    with pytest.raises(ConfigError, match="other validation people"):
        fit(TrainConfig(crops=str(crops), out=str(run), epochs=2, **FAST), resume=True, warn=lambda m: None)


def test_a_run_is_never_written_among_other_files_so_an_overwrite_cannot_delete_them(tmp_path, cli_run):
    """`train --out FOLDER` into a folder of other files trained a run among them, and `--overwrite` then swapped
    the whole folder away: a user's notes, or the very crops the run trained on (`train crops --out crops`), were
    deleted. Now each is one error line and nothing is touched; a run folder whose only strangers are a kill's
    temporary files is still replaced."""
    crops = make_crops(tmp_path / "c", people=12)
    before = _tree(crops)
    opts = ["--epochs", "1", "--img-size", "32", "--workers", "0", "--weights", "none", "--device", "cpu",
            "--preset", "none"]
    notes = tmp_path / "mine" / "docs" / "thesis.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("precious")
    for out, said in [(crops, f"--out {crops} is the crops folder this run trains on"),
                      (tmp_path, f"--out {tmp_path} holds the crops folder this run trains on"),
                      (notes.parent.parent, f"{notes.parent.parent} holds docs, which no run writes")]:
        for extra in ([], ["--overwrite"]):
            res = cli_run("train", crops, "--out", out, *opts, *extra, timeout=300)
            assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
            assert said in " ".join(res.stdout.split() + res.stderr.split()), res.stdout + res.stderr
    assert _tree(crops) == before and notes.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "mine"]  # no run written anywhere

    run = tmp_path / "r"
    fit(TrainConfig(crops=str(crops), out=str(run), epochs=1, **FAST), warn=lambda m: None)
    (run / "submission.csv").write_text("ImageID,ans\n")  # e.g. predict --out run/submission.csv
    res = cli_run("train", crops, "--out", run, "--overwrite", *opts, timeout=300)
    assert res.returncode == 1 and "holds submission.csv beside its run: --overwrite replaces the whole folder" in \
        " ".join(res.stdout.split() + res.stderr.split()), res.stdout + res.stderr
    assert (run / "submission.csv").read_text() == "ImageID,ans\n" and (run / rundir.BEST).is_file()
    (run / "submission.csv").unlink()
    (run / ".best.pt.0a1b2c3d.tmp").write_bytes(b"half")  # what a killed write leaves: the run's own
    (run / ".DS_Store").write_bytes(b"\0")  # what a file manager leaves: nobody's work
    res = cli_run("train", crops, "--out", run, "--overwrite", *opts, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (run / ".best.pt.0a1b2c3d.tmp").exists() and not (run / ".DS_Store").exists()
    assert (run / rundir.BEST).is_file()
