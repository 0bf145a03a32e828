"""The fine-tuning recipe: learning rates and schedule, accumulation, EMA, early stopping, the
competition's age boundary in validation, k-fold in one command with its resume and its ensemble,
and the weights' normalisation carried through to predict. Synthetic crops with visible classes."""
from __future__ import annotations

import collections
import csv
import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from classify.checkpoint import load_checkpoint
from classify.errors import ConfigError
from classify.inference.predictor import predict
from classify.training.config import TrainConfig, resume_config
from classify.data.dataset import boundary_distance, prepare_data
from classify.training.schedule import create_optimizer, create_scheduler
from classify.training.train import fit
from preprocess import labels as L
from classify.inference.card import card_of
from tests.conftest import make_crops

FAST = dict(model="resnet18", img_size=32, batch_size=32, lr=1e-3, workers=0, weights="none", device="cpu",
            preset="none", val_ratio=0.25)


def _fit(crops, out, **kw):
    return fit(TrainConfig(crops=str(crops), out=str(out), **(FAST | kw)), warn=lambda m: None)


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    return make_crops(tmp_path_factory.mktemp("crops"), people=24)


def test_pretrained_backbone_learns_slower_and_the_schedule_warms_up_then_follows_the_cosine():
    from classify.training.losses import MultiTaskLoss
    from classify.models.nets import create_model

    model = create_model("resnet18")
    cfg = TrainConfig(crops="x", out="y", lr=0.01, backbone_lr=0.1, epochs=4, warmup=1)
    opt = create_optimizer(cfg, model, MultiTaskLoss(lambda o, y: o.sum()), pretrained=True)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"head": 0.01, "backbone": 0.001}
    assert create_optimizer(cfg, model, MultiTaskLoss(lambda o, y: o.sum()), pretrained=False).param_groups[1]["lr"] == 0.01
    sched = create_scheduler(cfg, opt, steps_per_epoch=10)  # 10 warmup steps, cosine over 30
    seen = []
    for _ in range(40):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for step, lr in enumerate(seen):
        expect = 0.01 * (0.01 + 0.99 * step / 10) if step < 10 else 0.01 * (1 + math.cos(math.pi * (step - 10) / 30)) / 2
        assert lr == pytest.approx(expect, rel=1e-6), step
    assert opt.param_groups[1]["lr"] == pytest.approx(0.0, abs=1e-12)  # both groups reach the end together


def test_gradient_accumulation_equals_the_larger_batch(crops, tmp_path):
    """Head only (frozen backbone, no dropout, no augmentation): accum 2 x batch 16 takes the very
    steps of batch 32, the ragged last group (16 + 14 photos against one batch of 30) included."""
    kw = dict(epochs=1, freeze_backbone=True, dropout=0.0, lr=0.05)
    _fit(crops, tmp_path / "big", batch_size=32, **kw)
    _fit(crops, tmp_path / "acc", batch_size=16, accum=2, **kw)
    a = load_checkpoint(tmp_path / "big" / "last.pt")["model_state"]
    b = load_checkpoint(tmp_path / "acc" / "last.pt")["model_state"]
    assert torch.allclose(a["head.1.weight"], b["head.1.weight"], atol=1e-6)
    c = load_checkpoint(tmp_path / "big" / "last.pt")
    _fit(crops, tmp_path / "small", batch_size=16, **kw)  # without accumulation the steps differ
    assert not torch.allclose(c["model_state"]["head.1.weight"],
                              load_checkpoint(tmp_path / "small" / "last.pt")["model_state"]["head.1.weight"], atol=1e-6)


def test_ema_is_validated_each_epoch_and_best_pt_holds_the_weights_that_scored(crops, tmp_path):
    summary = _fit(crops, tmp_path / "r", epochs=3, ema=0.9)
    rows = _csv(tmp_path / "r" / "metrics.csv")
    for r in rows:
        assert float(r["val_f1"]) == pytest.approx(max(float(r["model_val_f1"]), float(r["ema_val_f1"])), abs=1e-6)
        assert r["weights_from"] == ("ema" if float(r["ema_val_f1"]) > float(r["model_val_f1"]) else "model")
    # best.pt's weights reproduce the best epoch's validation predictions, whichever weights won
    val = _csv(tmp_path / "r" / "val_predictions.csv")
    pred = predict([tmp_path / "r" / "best.pt"], crops, None, device="cpu", workers=0, calibrate=False)  # raw, as validated
    by_id = dict(zip(pred.image_ids, pred.probs))
    got = np.array([by_id[v["image_id"]] for v in val])
    want = np.array([[float(v[f"p{k}"]) for k in range(18)] for v in val])
    assert np.allclose(got, want, atol=1e-5)
    assert summary["best"]["epoch"] == summary["best_epoch"]


def test_early_stopping_stops_patience_epochs_after_the_best(tmp_path):
    noise = make_crops(tmp_path / "noise", people=24, shuffle_labels=True)
    summary = _fit(noise, tmp_path / "r", epochs=8, patience=2, lr=3e-3)
    assert summary["stopped_early"] and summary["epochs"] < 8
    assert summary["epochs"] - summary["best_epoch"] == 2
    assert len(_csv(tmp_path / "r" / "metrics.csv")) == summary["epochs"]


def test_val_old_scores_the_competition_boundary_whatever_old_trained(tmp_path):
    crops = make_crops(tmp_path / "c", people=40, ages=(22, 45, 58, 59, 70))
    summary = _fit(crops, tmp_path / "r", epochs=1, old=58, val_old=60, val_ratio=0.5)
    from preprocess.manifest import read_manifest

    ages = {r["image_id"]: r["age"] for r in read_manifest(crops)}
    val = _csv(tmp_path / "r" / "val_predictions.csv")
    near = [v for v in val if ages[v["image_id"]] in (58, 59)]
    assert near and all(int(v["label"]) % 3 == 1 for v in near)  # 58-59 is 30-59 at the competition's 60
    assert all(int(v["label"]) % 3 == L.age_group(ages[v["image_id"]], 60) for v in val)
    from classify.metrics import scores

    rescored = scores([int(v["label"]) for v in val], [int(v["pred"]) for v in val])
    assert summary["best"]["val_f1"] == pytest.approx(rescored["f1"]) and summary["val_old"] == 60
    ckpt = load_checkpoint(tmp_path / "r" / "best.pt")
    assert ckpt["config"]["old"] == 58 and ckpt["config"]["val_old"] == 60
    from classify.inference.evaluate import evaluate

    res = evaluate([tmp_path / "r" / "best.pt"], crops, device="cpu", workers=0)
    support_old = sum(sum(res["confusion"][k]) for k in range(18) if k % 3 == 2)
    assert support_old == sum(1 for a in ages.values() if a >= 60)  # evaluate labels at 60, not at 58


def test_drop_ages_near_leaves_out_training_people_near_a_boundary_and_never_validation(tmp_path):
    assert [boundary_distance(a, 60) for a in (28, 29, 30, 31, 45, 58, 59, 60, 61)] == [2, 1, 1, 2, 15, 2, 1, 1, 2]
    crops = make_crops(tmp_path / "c", people=40, ages=(22, 29, 30, 45, 59, 60, 70))
    cfg = TrainConfig(crops=str(crops), out="x", drop_ages_near=1, val_ratio=0.4)
    data = prepare_data(cfg)
    assert {r["age"] for r in data.train_rows}.isdisjoint({29, 30, 59, 60})
    assert {29, 30, 59, 60} & {r["age"] for r in data.val_rows}
    assert data.dropped_near_boundary == len(prepare_data(TrainConfig(crops=str(crops), out="x", val_ratio=0.4)).train_rows) - len(data.train_rows) > 0


def test_a_run_folder_is_not_replaced_without_resume_or_overwrite(crops, tmp_path):
    _fit(crops, tmp_path / "r", epochs=1)
    before = (tmp_path / "r" / "best.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"already holds a run .*--resume.*--overwrite"):
        _fit(crops, tmp_path / "r", epochs=1, seed=7)
    assert (tmp_path / "r" / "best.pt").read_bytes() == before
    fit(TrainConfig(crops=str(crops), out=str(tmp_path / "r"), **(FAST | {"epochs": 1, "seed": 7})), overwrite=True,
        warn=lambda m: None)
    assert load_checkpoint(tmp_path / "r" / "best.pt")["config"]["seed"] == 7


def test_persistent_workers_give_the_batches_of_a_single_process(crops, tmp_path):
    kw = dict(epochs=2, preset="strong", mix="cutmix")
    _fit(crops, tmp_path / "w0", workers=0, **kw)
    _fit(crops, tmp_path / "w2", workers=2, **kw)
    assert (tmp_path / "w0" / "val_predictions.csv").read_text() == (tmp_path / "w2" / "val_predictions.csv").read_text()


KFOLD = dict(folds=3, fold="all", epochs=2)


def _drop_seconds(path):
    rows = _csv(path)
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_kfold_all_trains_every_fold_scores_out_of_fold_and_predict_votes_its_folds(crops, tmp_path):
    run = tmp_path / "kf"
    summary = _fit(crops, run, **KFOLD)
    oof = _csv(run / "oof_predictions.csv")
    ids = [r["image_id"] for r in oof]
    assert len(ids) == len(set(ids)) == 24 * 7  # every photo validated once, by the fold that left it out
    for k in range(3):
        split = {r["person_id"]: r["split"] for r in _csv(run / f"fold{k}" / "split.csv")}
        assert {r["image_id"].split("/")[0] for r in oof if r["fold"] == str(k)} == {p for p, s in split.items() if s == "val"}
    from classify.metrics import scores

    assert summary["oof"]["f1"] == pytest.approx(scores([int(r["label"]) for r in oof], [int(r["pred"]) for r in oof])["f1"])
    assert json.loads((run / "summary.json").read_text())["folds"] == 3

    folds = [predict([run / f"fold{k}" / "best.pt"], crops, None, device="cpu", workers=0) for k in range(3)]
    soft = predict([run], crops, tmp_path / "soft.csv", device="cpu", workers=0)
    assert np.allclose(soft.probs, np.mean([f.probs for f in folds], axis=0), atol=1e-9)
    assert soft.labels.tolist() == np.mean([f.probs for f in folds], axis=0).argmax(1).tolist()
    hard = predict([run], crops, tmp_path / "hard.csv", device="cpu", workers=0, vote="hard")
    mean = np.mean([f.probs for f in folds], axis=0)
    for i in range(len(hard.labels)):
        counts = collections.Counter(int(f.labels[i]) for f in folds)
        top = max(counts.values())
        tied = [c for c, n in counts.items() if n == top]
        assert hard.labels[i] == max(tied, key=lambda c: mean[i, c])
    assert [r["ans"] for r in _csv(tmp_path / "hard.csv")] == [str(int(v)) for v in hard.labels]


def test_kfold_resumed_in_the_middle_of_fold_2_ends_like_an_uninterrupted_run(crops, tmp_path):
    _fit(crops, tmp_path / "full", **KFOLD)

    class Killed(Exception):
        pass

    def die(rec):
        if rec["fold"] == 1 and rec["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        fit(TrainConfig(crops=str(crops), out=str(tmp_path / "cut"), **(FAST | KFOLD)), on_epoch=die, warn=lambda m: None)
    assert (tmp_path / "cut" / "fold0" / "summary.json").is_file() and not (tmp_path / "cut" / "fold2").exists()
    fold0 = load_checkpoint(tmp_path / "cut" / "fold0" / "best.pt")["model_state"]
    fit(resume_config(tmp_path / "cut", {"workers": 0}), resume=True, warn=lambda m: None)
    again = load_checkpoint(tmp_path / "cut" / "fold0" / "best.pt")["model_state"]
    assert all(torch.equal(fold0[k], again[k]) for k in fold0)  # the finished fold was not retrained
    # (its best.pt was rewritten once, to carry the temperature fitted on every fold's predictions)
    assert card_of(load_checkpoint(tmp_path / "cut" / "fold0" / "best.pt")).temperature == \
        card_of(load_checkpoint(tmp_path / "full" / "fold0" / "best.pt")).temperature
    for k in range(3):
        assert _drop_seconds(tmp_path / "full" / f"fold{k}" / "metrics.csv") == _drop_seconds(tmp_path / "cut" / f"fold{k}" / "metrics.csv")
    assert (tmp_path / "full" / "oof_predictions.csv").read_text() == (tmp_path / "cut" / "oof_predictions.csv").read_text()


def test_an_ensemble_of_different_old_is_refused(crops, tmp_path):
    from classify.errors import CheckpointError

    _fit(crops, tmp_path / "a", epochs=1, old=58)
    _fit(crops, tmp_path / "b", epochs=1, old=60)
    with pytest.raises(CheckpointError, match=r"different --old \(58, 60\)"):
        predict([tmp_path / "a" / "best.pt", tmp_path / "b" / "best.pt"], crops, None, device="cpu", workers=0)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm (the maskcls[timm] extra) is not installed")
def test_the_weights_normalisation_is_stored_and_used_by_predict(crops, tmp_path):
    """A timm model whose weights expect mean = std = 0.5 and bicubic resizing: the checkpoint says so and
    predict's probabilities are those of that preprocessing, not ImageNet's."""
    from classify.data.dataset import CropDataset, load_rows
    from classify.inference.answer import model_probs
    from classify.inference.engine import infer, make_loader
    from classify.inference.torch_backend import load_model
    from classify.data.transforms import build_transform

    _fit(crops, tmp_path / "r", model="timm/test_convnext.r160_in1k", epochs=1, img_size=56)  # enlarged: interpolation matters
    ckpt = load_checkpoint(tmp_path / "r" / "best.pt")
    assert card_of(ckpt).norm == {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    pred = predict([tmp_path / "r" / "best.pt"], crops, None, device="cpu", workers=0, calibrate=False)
    rows = load_rows(crops)[0]
    model = load_model(ckpt, torch.device("cpu"))

    def probs(mean, std, interpolation):
        ds = CropDataset(crops, rows, build_transform("none", 56, False, interpolation))
        logits = infer(model, make_loader(ds, 64, 0, torch.device("cpu")), torch.device("cpu"), mean=mean, std=std)[1]
        return model_probs(logits)

    assert np.allclose(pred.probs, probs([0.5] * 3, [0.5] * 3, "bicubic"), atol=1e-6)
    assert not np.allclose(pred.probs, probs([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], "bicubic"), atol=1e-3)
    assert not np.allclose(pred.probs, probs([0.5] * 3, [0.5] * 3, "bilinear"), atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard (an optional extra) is not installed")
def test_tensorboard_events_hold_the_numbers_of_metrics_csv(crops, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _fit(crops, tmp_path / "r", epochs=2, model="attention")
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    rows = _csv(tmp_path / "r" / "metrics.csv")
    tags = set(acc.Tags()["scalars"])
    for col in ("train_loss", "train_loss_age", "val_loss", "val_f1", "val_mask_f1", "val_gender_f1", "val_age_f1",
                "lr", "weight_age"):
        assert col in tags, col
        events = acc.Scalars(col)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([float(r[col]) for r in rows], rel=1e-5, abs=1e-6), col
    assert acc.Tags()["images"] == ["validation crops"] and len(acc.Images("validation crops")) >= 1


def test_without_tensorboard_training_is_unchanged_and_says_so_once(crops, tmp_path, monkeypatch):
    import sys

    import classify.training.train as T

    with_tb = _fit(crops, tmp_path / "a", epochs=1)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails, as without the package
    monkeypatch.setattr(T, "_WARNED", set())
    warned = []
    fit(TrainConfig(crops=str(crops), out=str(tmp_path / "b"), **(FAST | {"epochs": 1, "folds": 2, "fold": "all"})),
        warn=warned.append)
    warned = [w for w in warned if not w.startswith("validation holds")]  # this test's small folds say so too
    assert [w for w in warned if "TensorBoard" in w] == [warned[0]] and len(warned) == 1  # two folds, one note
    fit(TrainConfig(crops=str(crops), out=str(tmp_path / "c"), **(FAST | {"epochs": 1})), warn=warned.append)
    assert not (tmp_path / "c" / "tensorboard").exists()
    assert (tmp_path / "c" / "val_predictions.csv").read_text() == (tmp_path / "a" / "val_predictions.csv").read_text()
    assert with_tb["best"]["val_f1"] == pytest.approx(json.loads((tmp_path / "c" / "summary.json").read_text())["best"]["val_f1"])


def test_compare_names_the_differing_keys_and_each_runs_best_scores(crops, tmp_path):
    from classify.study.compare import compare

    _fit(crops, tmp_path / "a", epochs=2, lr=1e-3)
    _fit(crops, tmp_path / "b", epochs=2, lr=3e-3, loss="ce")
    _fit(crops, tmp_path / "k", epochs=1, folds=2, fold="all")
    runs, keys, index = compare([tmp_path / "a", tmp_path / "b", tmp_path / "k"], tmp_path / "cmp")
    assert keys == ["epochs", "fold", "folds", "loss", "lr"]  # not out, seed, model, device, workers...
    rows = {r["run"]: r for r in _csv(tmp_path / "cmp" / "compare.csv")}
    for name in ("a", "b"):  # each run's best epoch, read independently from its metrics.csv
        best = max(_csv(tmp_path / name / "metrics.csv"), key=lambda r: float(r["val_f1"]))
        for k in ("val_f1", "val_acc", "val_mask_f1", "val_gender_f1", "val_age_f1"):
            assert float(rows[name][f"{k}_mean"]) == pytest.approx(float(best[k]), abs=1e-6)
        assert rows[name]["folds"] == "0" and rows[name]["val_f1_std"] == ""
    assert rows["a"]["lr"] == "0.001" and rows["b"]["loss"] == "ce"  # written as a person writes them
    fold_best = [max(float(r["val_f1"]) for r in _csv(tmp_path / "k" / f"fold{i}" / "metrics.csv")) for i in range(2)]
    assert float(rows["k"]["val_f1_mean"]) == pytest.approx(np.mean(fold_best), abs=1e-6)
    assert float(rows["k"]["val_f1_std"]) == pytest.approx(np.std(fold_best), abs=1e-6)
    assert float(rows["k"]["oof_f1"]) == pytest.approx(json.loads((tmp_path / "k" / "summary.json").read_text())["oof"]["f1"], abs=1e-6)
    assert (tmp_path / "cmp" / "curves.png").is_file() and (tmp_path / "cmp" / "task_f1.png").is_file()
    assert "lr" in index.read_text() and "2 folds" in index.read_text()
    with pytest.raises(ConfigError, match="give two or more run folders"):
        compare([tmp_path / "a"], tmp_path / "cmp2")
    with pytest.raises(ConfigError, match="not a `maskcls train` run folder"):
        compare([tmp_path / "a", crops], tmp_path / "cmp3")
    assert not (tmp_path / "cmp3").exists()
