"""Silent bugs a code reading found (issue 20), each pinned by a test that failed before its fix:
resumed schedules, early stops and normalisation, mixed precision on older GPUs, pseudo-labels of the
training photos, the wce weights under --synth-mask, the out-of-fold score's selection, the crop
cache's change detection, predict's crop cache, and the macro F1 against scikit-learn."""
from __future__ import annotations

import csv
import os
import threading
import warnings

import numpy as np
import pytest
import torch

from classify.checkpoint import load_checkpoint
from classify.training.config import TrainConfig, resume_config
from classify.errors import ConfigError
from classify.training.train import fit
from preprocess import labels as L
from classify.inference.card import card_of
from tests.conftest import FakeDetector, make_crops, make_person, photo

FAST = dict(model="resnet18", img_size=32, batch_size=32, lr=1e-3, workers=0, weights="none", device="cpu",
            preset="none", val_ratio=0.25)


def _fit(crops, out, **kw):
    return fit(TrainConfig(crops=str(crops), out=str(out), **(FAST | kw)), warn=lambda m: None)


def _metrics(run):
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


class Killed(Exception):
    pass


def _kill_after(epoch):
    def on_epoch(record):
        if record["epoch"] == epoch:
            raise Killed  # the process dies right after this epoch was saved
    return on_epoch


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    return make_crops(tmp_path_factory.mktemp("crops"), people=24)


# -- a. every schedule is a function of the step ------------------------------------------------------------

def test_a_resumed_onecycle_run_equals_the_uninterrupted_run_in_every_column(crops, tmp_path):
    """OneCycleLR rebuilt on resume took max_lr/25 for its peak: epoch 2 learned 25x slower."""
    _fit(crops, tmp_path / "full", epochs=3, scheduler="onecycle")
    with pytest.raises(Killed):
        fit(TrainConfig(crops=str(crops), out=str(tmp_path / "cut"), **(FAST | {"epochs": 3, "scheduler": "onecycle"})),
            on_epoch=_kill_after(1), warn=lambda m: None)
    fit(resume_config(tmp_path / "cut"), resume=True, warn=lambda m: None)
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "cut")


def test_resume_with_more_epochs_follows_the_longer_onecycle_plan(crops, tmp_path):
    from classify.training.schedule import lr_factor

    _fit(crops, tmp_path / "r", epochs=1, scheduler="onecycle")
    fit(resume_config(tmp_path / "r", {"epochs": 3}), resume=True, warn=lambda m: None)
    lrs = [float(r["lr"]) for r in _metrics(tmp_path / "r")]
    plan = TrainConfig(crops="x", out="y", epochs=3, scheduler="onecycle")
    steps = load_checkpoint(tmp_path / "r" / "last.pt")["steps_done"] // 3
    assert lrs[1:] == pytest.approx([1e-3 * lr_factor(plan, e * steps, steps) for e in (2, 3)], rel=1e-5)
    assert lrs[1] > 1e-4  # on the way down from the peak: a rebuilt OneCycleLR (peak/25) gave ~1e-5


def test_the_onecycle_curve_is_torchs():
    from classify.training.schedule import create_scheduler

    cfg = TrainConfig(crops="x", out="y", epochs=4, scheduler="onecycle")
    p = torch.nn.Parameter(torch.zeros(1))
    ours = torch.optim.SGD([p], lr=0.1)
    ref = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    a, b = create_scheduler(cfg, ours, 10), torch.optim.lr_scheduler.OneCycleLR(ref, 0.1, total_steps=40,
                                                                                  cycle_momentum=False)
    for _ in range(40):
        assert ours.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        ours.step(), ref.step(), a.step(), b.step()


# -- b. an early-stopped run stays stopped ---------------------------------------------------------------------

def test_resuming_a_run_that_stopped_early_trains_no_more(tmp_path):
    noise = make_crops(tmp_path / "noise", people=24, shuffle_labels=True)
    first = _fit(noise, tmp_path / "r", epochs=8, patience=2, lr=3e-3)
    assert first["stopped_early"] and first["epochs"] < 8
    last = (tmp_path / "r" / "last.pt").read_bytes()
    again = fit(resume_config(tmp_path / "r"), resume=True, warn=lambda m: None)
    assert again["epochs"] == first["epochs"] and again["stopped_early"]
    assert (tmp_path / "r" / "last.pt").read_bytes() == last
    assert len(_metrics(tmp_path / "r")) == first["epochs"]
    more = fit(resume_config(tmp_path / "r", {"patience": 20}), resume=True, warn=lambda m: None)
    assert more["epochs"] == 8  # a longer patience is a reason to go on


# -- c. a resumed run keeps its normalisation ----------------------------------------------------------------

def test_a_resumed_run_keeps_the_normalisation_of_its_weights(crops, tmp_path, monkeypatch):
    """A weights set whose own config differs from the architecture's default (here: mean = std = 0.5,
    bicubic): the resumed epochs must normalise as the first ones did."""
    import classify.models.weights as W
    from classify.models.nets import create_model

    special = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    plain = W.data_config
    monkeypatch.setattr(W, "data_config", lambda arch, net=None, which="imagenet":
                        special if str(which).endswith("special.pth") else plain(arch, net, which))
    weights = tmp_path / "special.pth"
    torch.save(create_model("resnet18").backbone.net.state_dict(), weights)
    kw = dict(epochs=2, weights=str(weights))
    _fit(crops, tmp_path / "full", **kw)
    with pytest.raises(Killed):
        fit(TrainConfig(crops=str(crops), out=str(tmp_path / "cut"), **(FAST | kw)), on_epoch=_kill_after(1),
            warn=lambda m: None)
    fit(resume_config(tmp_path / "cut"), resume=True, warn=lambda m: None)
    for name in ("last.pt", "best.pt"):
        assert card_of(load_checkpoint(tmp_path / "cut" / name)).mean == (0.5,) * 3
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "cut")


# -- f, g. mixed precision ----------------------------------------------------------------------------------

@pytest.mark.parametrize("capability, expect", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_amp_auto_takes_bf16_only_where_the_gpu_has_it(monkeypatch, capability, expect):
    """V100 (7.0) and T4 (7.5) report bf16 as supported, by emulation: slow. auto must take fp16 there."""
    from classify.inference.engine import resolve_amp

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert resolve_amp("auto", torch.device("cuda", 0)) == expect
    assert resolve_amp("auto", torch.device("cpu")) == "off"


def test_under_fp16_a_step_the_scaler_skips_does_not_stop_the_run(crops, tmp_path, monkeypatch):
    """GradScaler exists to skip an overflowing step and lower its scale; the finite-loss guard stopped
    the run there. With the scaler (fp16, here on the CPU) one NaN loss is skipped and counted; many
    in a row still stop the run, saying so."""
    import classify.training.train as T
    from classify.errors import TrainingError
    from tests.helpers import nan_at_call

    monkeypatch.setattr(T, "resolve_amp", lambda amp, device: "fp16")
    monkeypatch.setattr(T, "make_loss", nan_at_call(T.make_loss, 3))
    summary = _fit(crops, tmp_path / "r", epochs=2)
    rows = _metrics(tmp_path / "r")
    assert [int(r["train_skipped_steps"]) for r in rows] == [1, 0] and summary["epochs"] == 2
    assert all(np.isfinite(float(r["train_loss"])) for r in rows)

    always_nan = lambda *a, **k: (lambda logits, y: logits.sum() * float("nan"))  # noqa: E731
    monkeypatch.setattr(T, "make_loss", always_nan)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(TrainingError, match=r"non-finite for 10 steps in a row under fp16 \(GradScaler skipped each"):
            _fit(crops, tmp_path / "r2", epochs=3, batch_size=4)
    # a skipped first step must not put torch's "lr_scheduler.step() before optimizer.step()" on the user's terminal
    assert not [w for w in seen if "lr_scheduler.step()" in str(w.message)]


# -- h. pseudo-labels of the training photos ---------------------------------------------------------------

def test_an_extra_folder_holding_training_photos_is_refused_by_content(tmp_path):
    """Pseudo-labels made from the training photos (here: renamed copies in an eval folder) would carry
    validation photos back into training under `pseudo:<id>`."""
    from classify.data.dataset import prepare_data
    from classify.inference.pseudo import pseudo_label
    from preprocess import CropConfig, crop_dataset

    images = tmp_path / "raw" / "images"
    for p in range(8):
        make_person(images, f"{p:06d}_{('male', 'female')[p % 2]}_Asian_{(22, 45, 70)[p % 3]}",
                    box=(120 + 5 * p, 150, 250 + 5 * p, 280))
    crop_dataset(tmp_path / "raw", tmp_path / "crops", CropConfig(size=48), detector=FakeDetector())
    run = tmp_path / "run"
    _fit(tmp_path / "crops", run, epochs=1, val_ratio=0.3)

    def eval_folder(name, photos):
        (tmp_path / name / "images").mkdir(parents=True)
        lines = ["ImageID,ans"]
        for k, src in enumerate(photos):
            (tmp_path / name / "images" / f"e{k}.jpg").write_bytes(src.read_bytes())
            lines.append(f"e{k}.jpg,0")
        (tmp_path / name / "info.csv").write_text("\n".join(lines) + "\n")
        return tmp_path / name

    from tests.conftest import save_rgb

    fresh = []
    for k in range(3):
        save_rgb(tmp_path / "new" / f"{k}.jpg", photo(seed=100 + k))
        fresh.append(tmp_path / "new" / f"{k}.jpg")
    leaked = eval_folder("leaked", fresh + sorted(images.glob("00000[12]*/mask1.jpg")))
    clean = eval_folder("clean", fresh)
    for name, source in (("ps_leaked", leaked), ("ps_clean", clean)):
        pseudo_label([run], source, tmp_path / name, min_prob=0.01, cache=tmp_path / f"cache_{name}",
                     device="cpu", workers=0, detector=FakeDetector())
    cfg = lambda extra: TrainConfig(crops=str(tmp_path / "crops"), out="x", **FAST, extra=(str(extra),))  # noqa: E731
    with pytest.raises(ConfigError, match=r"2 of its photos are photos of the training crops .*e3\.jpg = 00000[12]"):
        prepare_data(cfg(tmp_path / "ps_leaked"))
    data = prepare_data(cfg(tmp_path / "ps_clean"))
    guesses = [w for w in data.warnings if "labels are the guesses of a model that has not learned" in w]  # a weak run
    assert data.extra == 3 and not [w for w in data.warnings if not w.startswith("validation holds") and w not in guesses]
    pseudo_label([run], tmp_path / "crops", tmp_path / "ps_self", min_prob=0.01, device="cpu", workers=0)
    with pytest.raises(ConfigError, match="photos of the training crops"):  # the training crops themselves
        prepare_data(cfg(tmp_path / "ps_self"))


# -- l. the wce weights see the class mix training sees -----------------------------------------------------

def test_wce_counts_the_class_mix_that_synth_mask_makes(tmp_path):
    """Over many epochs, the labels CropDataset draws average to expected_class_counts (what the
    wce weights are counted on); the manifest's counts are off by the moved share."""
    from classify.data.dataset import CropDataset, expected_class_counts, load_rows
    from classify.data.transforms import build_transform

    crops = make_crops(tmp_path / "c", people=18, size=64)
    rows = load_rows(crops)[1]
    for r in rows:
        r["landmarks"] = [20, 26, 44, 26, 32, 36, 23, 46, 41, 46]
    ds = CropDataset(crops, rows, build_transform("none", 64, True), seed=3, synth_mask=0.6)
    unmasked = [i for i, r in enumerate(rows) if r["mask"] == 2]
    drawn = np.zeros(L.NUM_CLASSES)
    epochs = 60
    for e in range(epochs):
        for i in unmasked:
            drawn[int(ds[(i, e)][1])] += 1
    drawn = drawn / epochs + np.bincount([r["label"] for r in rows if r["mask"] != 2], minlength=18)
    expected = expected_class_counts(rows, 0.6)
    plain = np.bincount([r["label"] for r in rows], minlength=18)
    assert expected.sum() == pytest.approx(len(rows))
    assert np.abs(drawn - expected).max() < 0.6 < 1.5 < np.abs(drawn - plain).max()


# -- m. the out-of-fold score says what it selected -----------------------------------------------------------

def test_kfold_gives_the_out_of_fold_score_of_the_last_epochs_too(crops, tmp_path):
    from classify.metrics import scores
    from classify.inference.predictor import predict

    summary = _fit(crops, tmp_path / "kf", folds=2, fold="all", epochs=2)
    assert "selected on that same fold" in summary["oof_note"]
    ys, ps = [], []
    for k in range(2):
        with open(tmp_path / "kf" / f"fold{k}" / "split.csv") as f:
            val = {r["person_id"] for r in csv.DictReader(f) if r["split"] == "val"}
        pred = predict([tmp_path / "kf" / f"fold{k}" / "last.pt"], crops, None, device="cpu", workers=0)
        keep = [i for i, r in enumerate(pred.rows) if r["person_id"] in val]
        ys += [pred.rows[i]["label"] for i in keep]
        ps += [int(pred.labels[i]) for i in keep]
    assert summary["oof_last"] == pytest.approx(scores(ys, ps))


# -- n, j. the crop cache ---------------------------------------------------------------------------------

def test_a_photo_rewritten_in_place_with_the_same_byte_size_is_detected_again(tmp_path):
    import cv2

    from preprocess import CropConfig, crop_dataset
    from preprocess.manifest import read_manifest

    person = tmp_path / "raw" / "images" / "000001_female_Asian_45"
    person.mkdir(parents=True)

    def save(stem, box):  # uncompressed PNG: its byte size depends on the pixel count only
        ok, buf = cv2.imencode(".png", photo(box), [cv2.IMWRITE_PNG_COMPRESSION, 0])
        (person / f"{stem}.png").write_bytes(buf.tobytes())

    for stem in L.MASK_FILES:
        save(stem, (140, 160, 260, 280))
    det = FakeDetector()
    crop_dataset(tmp_path / "raw", tmp_path / "c", CropConfig(size=48), detector=det)
    target = person / "mask2.png"
    size, mtime = target.stat().st_size, target.stat().st_mtime_ns
    save("mask2", (40, 60, 160, 180))
    os.utime(target, ns=(mtime + 10**9, mtime + 10**9))
    assert target.stat().st_size == size
    res = crop_dataset(tmp_path / "raw", tmp_path / "c", CropConfig(size=48), detector=FakeDetector())
    assert res.detected == 1
    row = next(r for r in read_manifest(tmp_path / "c") if r["image_id"].endswith("mask2"))
    assert row["status"] == "person_box" and "(40, 60" in row["reason"]  # its face moved away from the person's place


def test_predicts_default_crop_cache_is_keyed_by_the_crop_settings_and_shared_safely(tmp_path, monkeypatch):
    """Two checkpoints trained on crops of another size must not share (and overwrite) one cache
    folder; two crops into one folder at once take turns and both end with the full manifest."""
    from classify.inference.cropping import default_cache
    from preprocess import CropConfig, crop_dataset
    from preprocess.manifest import read_manifest

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    det = FakeDetector()
    meta = {"key": "k1", "config": {"size": 256, "margin": 0.3}, "prior": None}
    a = default_cache(tmp_path / "eval", meta, det)
    assert a == default_cache(tmp_path / "eval", dict(meta), det)
    assert a != default_cache(tmp_path / "eval", meta | {"key": "k2", "config": {"size": 128, "margin": 0.3}}, det)
    assert a != default_cache(tmp_path / "other", meta, det)

    for p in range(6):
        make_person(tmp_path / "raw" / "images", f"{p:06d}_male_Asian_30")
    errors, results = [], []

    def run():
        try:
            results.append(crop_dataset(tmp_path / "raw", tmp_path / "shared", CropConfig(size=48, batch_size=7),
                                        detector=FakeDetector()))
        except Exception as e:  # noqa: BLE001 - the test reports any failure of either thread
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(r.detected for r in results) == [0, 42]  # the second waited, then found it all cached
    assert len(read_manifest(tmp_path / "shared")) == 42


# -- o, p. ------------------------------------------------------------------------------------------------------

def test_macro_f1_equals_scikit_learns_with_absent_classes():
    sklearn = pytest.importorskip("sklearn.metrics")
    from classify.metrics import macro_f1, scores

    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(1, 200))
        present = rng.choice(18, size=int(rng.integers(1, 18)), replace=False)
        y = rng.choice(present, n)
        p = np.where(rng.random(n) < 0.5, y, rng.integers(0, 18, n))
        assert macro_f1(y, p, 18) == pytest.approx(sklearn.f1_score(y, p, average="macro"), abs=1e-12), trial
        s = scores(y, p)
        for task, yt, pt in zip(L.TASKS, L.task_parts(y), L.task_parts(p)):
            assert s[f"{task}_f1"] == pytest.approx(sklearn.f1_score(yt, pt, average="macro"), abs=1e-12)
