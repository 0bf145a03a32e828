"""Know when to trust a prediction (issue 23): temperature scaling fitted after training and applied by
predict and evaluate, the review list, and Grad-CAM maps per task."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from classify.inference.calibration import apply_temperature, calibrate, ece
from classify.checkpoint import load_checkpoint, save_checkpoint
from classify.training.config import TrainConfig
from classify.metrics import scores
from classify.inference.predictor import predict
from classify.training.train import fit
from classify.inference.card import card_of
from tests.conftest import SAMPLES, make_crops

FAST = dict(img_size=32, batch_size=32, lr=1e-3, workers=0, weights="none", device="cpu", preset="none", val_ratio=0.25)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cal")
    crops = make_crops(base / "c", people=16)
    fit(TrainConfig(crops=str(crops), out=str(base / "r"), model="attention", epochs=3, **FAST), warn=lambda m: None)
    return crops, base / "r"


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model_and_keeps_its_argmax():
    rng = np.random.default_rng(0)
    n = 4000
    logits = rng.normal(0, 1.5, (n, 18))
    honest = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(18, p=p) for p in honest])  # labels drawn from the model: calibrated by construction
    over = np.exp(5 * logits) / np.exp(5 * logits).sum(1, keepdims=True)  # the same model, five times too sure
    c = calibrate(5 * logits, y)
    fixed = apply_temperature(5 * logits, c["temperature"])
    assert 4 < c["temperature"] < 6 and c["ece_after"] < c["ece_before"] / 3
    assert c["ece_after"] == pytest.approx(ece(fixed, y)) and c["ece_after"] < ece(over, y)
    assert (fixed.argmax(1) == over.argmax(1)).all()
    assert scores(y, fixed.argmax(1)) == scores(y, over.argmax(1))  # accuracy and every F1 identical
    assert abs(np.log(calibrate(logits, y)["temperature"])) < np.log(1.15)  # a calibrated model is left near T = 1


def test_the_temperature_is_in_best_pt_and_predict_uses_it_and_an_old_checkpoint_reads_as_1(run, tmp_path):
    crops, r = run
    ckpt = load_checkpoint(r / "best.pt")
    summary = __import__("json").loads((r / "summary.json").read_text())
    t = summary["calibration"]["temperature"]
    assert card_of(ckpt).temperature == t and t != 1.0
    cal = predict([r / "best.pt"], crops, None, device="cpu", workers=0)
    raw = predict([r / "best.pt"], crops, None, device="cpu", workers=0, calibrate=False)
    assert np.allclose(cal.probs, apply_temperature(np.log(raw.probs), t), atol=1e-9)  # log p: the logits less a constant
    assert not np.allclose(cal.probs, raw.probs, atol=1e-3) and (cal.labels == raw.labels).all()
    old = ckpt | {"card": ckpt["card"] | {"calibration": {}}}  # a checkpoint from before calibration
    save_checkpoint(tmp_path / "old.pt", old)
    before = predict([tmp_path / "old.pt"], crops, None, device="cpu", workers=0)
    assert np.allclose(before.probs, raw.probs, atol=1e-9)


def test_evaluate_reports_the_ece_before_and_after(run):
    from classify.inference.evaluate import evaluate

    crops, r = run
    res = evaluate([r], crops, device="cpu", workers=0)
    plain = evaluate([r], crops, device="cpu", workers=0, calibrate=False)
    assert res["ece_before"] == pytest.approx(plain["ece_before"]) and res["ece_after"] != res["ece_before"]
    assert res["scores"] == plain["scores"]  # one model: the temperature moves no prediction


def test_a_kfold_run_fits_one_temperature_out_of_fold_and_every_fold_carries_it(tmp_path):
    crops = make_crops(tmp_path / "c", people=12)
    summary = fit(TrainConfig(crops=str(crops), out=str(tmp_path / "k"), model="resnet18", epochs=2, folds=2, fold="all",
                              **FAST), warn=lambda m: None)
    c = summary["calibration"]
    assert c["photos"] == summary["oof_photos"]
    assert [card_of(load_checkpoint(tmp_path / "k" / f"fold{k}" / "best.pt")).temperature for k in range(2)] == \
        [c["temperature"]] * 2
    off = fit(TrainConfig(crops=str(crops), out=str(tmp_path / "n"), model="resnet18", epochs=1, calibrate=False, **FAST),
              warn=lambda m: None)
    assert "calibration" not in off and card_of(load_checkpoint(tmp_path / "n" / "best.pt")).calibration == {}


def test_the_review_list_holds_exactly_the_unsure_photos_least_sure_first_with_their_top_3(run, tmp_path):
    crops, r = run
    pred = predict([r], crops, tmp_path / "s.csv", device="cpu", workers=0, review=tmp_path / "review.csv", below=0.7)
    with open(tmp_path / "review.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    top = pred.probs.max(1)
    assert [r["ImageID"] for r in rows] == [pred.image_ids[i] for i in np.argsort(top, kind="stable") if top[i] < 0.7]
    assert rows and all(float(r["p1"]) >= float(r["p2"]) >= float(r["p3"]) for r in rows)
    i = pred.image_ids.index(rows[0]["ImageID"])
    assert int(rows[0]["class1"]) == int(pred.probs[i].argmax()) and float(rows[0]["p_top"]) == pytest.approx(top[i], abs=1e-4)


def test_gradcam_maps_have_the_crops_shape_vary_and_differ_per_task(run):
    pytest.importorskip("pytorch_grad_cam")
    from classify.study.explain import cam_layer, task_maps
    from classify.inference.torch_backend import load_model

    crops, r = run
    model = load_model(load_checkpoint(r / "best.pt"), torch.device("cpu"))
    assert cam_layer(model, 64)[2] == "layer4"  # the last spatial stage, not the pooled features
    assert cam_layer(model, 32)[2] == "layer3"  # at 32 px layer4 is 1 x 1, as flat as pooling: the last map >= 2 x 2
    from classify.data.dataset import CropDataset, load_rows
    from classify.data.transforms import build_transform, normalize

    rows = load_rows(crops)[1][:8]
    ds = CropDataset(crops, rows, build_transform("none", 32, False))
    x = normalize(torch.stack([ds[i][0] for i in range(len(rows))]))
    maps, preds = task_maps(model, x, 32)
    varied = {}
    for task, m in maps.items():
        assert m.shape == (8, 32, 32) and np.isfinite(m).all()
        varied[task] = sum(int(m[k].std() > 1e-3) for k in range(8))
    # A hook on a 1 x 1 map (layer4 at 32 px, or after pooling) gives a flat map for every photo: 0 of 24,
    # measured. Grad-CAM's ReLU flattens a map whose evidence for the target class is negative everywhere,
    # and the target is predict's class, not the head's own argmax: how many depends on the model's floats
    # (this 3-epoch model: at least 6 of 8 per task where the test was written, 4, 8 and 6 of 8 on a later
    # machine), so the bar is most, not all.
    assert min(varied.values()) >= 2 and sum(varied.values()) >= 12, varied
    assert not np.allclose(maps["mask"], maps["gender"], atol=1e-3) and not np.allclose(maps["gender"], maps["age"], atol=1e-3)


def test_a_model_with_no_evidence_gets_flat_maps_marked_as_such(run, tmp_path):
    """Issue 34, item 5: 7 of 9 maps of a weak model were all zero and shown like any other map."""
    pytest.importorskip("pytorch_grad_cam")
    from classify.study.explain import explain_crops, flat_maps
    from preprocess.manifest import read_manifest

    crops, r = run
    ckpt = load_checkpoint(r / "best.pt")
    dead = {k: (torch.zeros_like(v) if "head" in k and k.endswith("weight") else v)
            for k, v in ckpt["model_state"].items()}  # every head answers 0 for every photo: no evidence
    rows = read_manifest(crops)[:3]
    _, table = explain_crops(ckpt | {"model_state": dead}, crops, rows, tmp_path / "dead", "dead")
    assert flat_maps(table) == (9, 9)
    _, table = explain_crops(ckpt, crops, rows, tmp_path / "alive", "alive")
    assert flat_maps(table)[0] < 9


@pytest.mark.slow
def test_explain_draws_each_photos_task_maps(sample_crops, tmp_path, cli_run):
    pytest.importorskip("pytorch_grad_cam")
    fit(TrainConfig(crops=str(sample_crops), out=str(tmp_path / "r"), model="resnet18", epochs=1, **FAST),
        warn=lambda m: None)
    photos = sorted((SAMPLES / "eval" / "images").iterdir())[:2]
    for again in range(2):  # with a crops cache, the second call (once refused: "crops of another RAW") reuses it
        res = cli_run("explain", tmp_path / "r", *photos, "--out", tmp_path / "ex", "--device", "cpu",
                      "--crops", tmp_path / "cache", timeout=300)
        assert res.returncode == 0, (again, res.stderr[-2000:])
    with open(tmp_path / "ex" / "gradcam.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["image_id"], r["task"]) for r in rows] == [(str(p), t) for p in photos for t in ("mask", "gender", "age")]
    drawn = [r for r in rows if r["flat"] == "0"]  # a flat map has no shares: it shows nothing
    assert all(0 <= float(r["lower_face_share"]) <= float(r["face_share"]) <= 1 for r in drawn)
    assert all(r["lower_face_share"] == r["face_share"] == "" for r in rows if r["flat"] == "1")
    flat = len(rows) - len(drawn)
    assert (f"{flat} of {len(rows)} Grad-CAM maps are flat" in res.stderr) == (flat > 0), res.stderr
    assert (tmp_path / "ex" / "gradcam.png").stat().st_size > 10_000
    # A model that has not learned a task: explain says so as predict does, and the CSV marks those tasks' rows
    # (their answers and maps show a guess). It printed neither before.
    from classify.inference.card import card_of_run

    card = card_of_run(tmp_path / "r")
    assert card.unlearned  # one epoch from random init on 8 sample people with invented labels
    assert card.caution in " ".join(res.stderr.split())
    assert {(r["task"], r["learned"]) for r in rows} == {(t, str(int(t not in card.unlearned)))
                                                          for t in ("mask", "gender", "age")}
