"""One model, one way to run it (issue 28): a checkpoint and its ONNX export hand logits to the one
`answer.answer`, so they agree on probabilities at any temperature, per fold; the temperature is fitted in
the form it is applied, on full-precision logits, and checked against the run's own data; an option an
exported model cannot honour is an error; a served answer never contradicts itself."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from classify.training.config import TrainConfig
from classify.training.train import fit
from classify.inference.card import card_of
from tests.conftest import make_crops

pytestmark = pytest.mark.slow
FAST = dict(img_size=32, batch_size=32, lr=1e-3, workers=0, weights="none", device="cpu", preset="none", val_ratio=0.25)


@pytest.fixture(scope="module")
def kfold(tmp_path_factory):
    """A 2-fold run on crops whose classes are visible (out-of-fold accuracy ~0.95, under-confident: T ~0.1)."""
    base = tmp_path_factory.mktemp("one")
    crops = make_crops(base / "c", people=24)
    summary = fit(TrainConfig(crops=str(crops), out=str(base / "k"), model="resnet18", epochs=5, folds=2, fold="all",
                              **FAST), warn=lambda m: None)
    return crops, base / "k", summary


def _val_rows(crops, fold_dir):
    from classify.inference import rundir
    from classify.data.dataset import load_rows, person_key

    split = rundir.read_split(fold_dir)
    return [r for r in load_rows(crops)[1] if split.get(person_key(r)) == "val"]  # "index": the row in crops.npy


def test_the_out_of_fold_temperature_is_the_fit_of_the_folds_logits_recomputed_in_memory(kfold):
    import torch

    from classify.inference.calibration import fit_temperature
    from classify.checkpoint import load_checkpoint
    from classify.inference.torch_backend import model_logits

    crops, run, summary = kfold
    z, y = [], []
    for k in range(2):
        rows = _val_rows(crops, run / f"fold{k}")
        z.append(model_logits([load_checkpoint(run / f"fold{k}" / "best.pt")], crops, rows, torch.device("cpu"),
                              workers=0)[0][0])
        y.append(np.array([r["label"] for r in rows]))
    z, y = np.concatenate(z), np.concatenate(y)
    cal = summary["calibration"]
    assert cal["photos"] == len(y) and cal["space"] == "logits"
    assert cal["fitted"] == pytest.approx(fit_temperature(z, y), rel=1e-4)
    assert cal["nll_after"] <= cal["nll_before"] + 1e-12


def test_the_stored_temperature_is_the_fit_of_the_runs_own_validation_logits_and_labels(kfold):
    """Recomputed from the folds' logits and the manifest's labels (not from anything the run wrote about
    labels): a T fitted against other labels would not match."""
    from classify.inference import rundir
    from classify.inference.calibration import calibrate
    from classify.checkpoint import load_checkpoint
    from classify.data.dataset import load_rows

    crops, run, _ = kfold
    label = {r["image_id"]: r["label"] for r in load_rows(crops)[1]}
    parts = [rundir.read_val_logits(run / f"fold{k}") for k in range(2)]
    z = np.concatenate([p[1] for p in parts])
    y = np.array([label[i] for p in parts for i in p[0]])
    want = calibrate(z, y)
    assert "kept" not in want and 0.06 < want["temperature"] < 10  # a fit inside the range, applied
    for k in range(2):
        assert card_of(load_checkpoint(run / f"fold{k}" / "best.pt")).temperature == pytest.approx(want["temperature"], rel=1e-9)
    assert want["nll_after"] < want["nll_before"]
    shuffled = calibrate(z, np.random.default_rng(0).permutation(y))
    assert shuffled["temperature"] != pytest.approx(want["temperature"], rel=1e-2)


@pytest.mark.parametrize("t", ["fitted", 1.0, 3.0, 8.0])
def test_checkpoint_and_onnx_agree_on_probabilities_per_fold_temperature_and_normalisation(kfold, tmp_path, t):
    pytest.importorskip("onnxscript")
    from classify.checkpoint import load_checkpoint, save_checkpoint
    from classify.inference.predictor import predict as predict_onnx  # the one predict, given an .onnx
    from classify.deploy.export import export
    from classify.inference.predictor import predict

    crops, run, summary = kfold
    fitted = t == "fitted"
    t = summary["calibration"]["temperature"] if fitted else t
    paths = []
    for k, (temp, mean, std) in enumerate(((t, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                                           (t * 1.7, (0.5, 0.5, 0.5), (0.25, 0.3, 0.2)))):
        ckpt = load_checkpoint(run / f"fold{k}" / "best.pt")
        paths.append(tmp_path / f"fold{k}.pt")
        card = dataclasses.replace(card_of(ckpt), mean=mean, std=std).calibrated({"temperature": temp})
        save_checkpoint(paths[-1], ckpt | {"card": card.to_dict()})
    export(paths, tmp_path / "m.onnx")
    for vote in ("soft", "hard"):
        for calibrate in (True, False):
            want = predict(paths, crops, None, device="cpu", workers=0, vote=vote, calibrate=calibrate)
            got = predict_onnx([tmp_path / "m.onnx"], crops, vote=vote, calibrate=calibrate)
            assert np.abs(got.probs - want.probs).max() < 1e-5, (vote, calibrate)
            assert (got.labels == want.labels).all()
    if fitted:  # at its own temperatures the ensemble is confident, not uniform
        assert predict(paths, crops, None, device="cpu", workers=0).probs.max(1).mean() > 0.5  # uniform: 0.056


@pytest.mark.parametrize("option", [["--workers", "0"], ["--tta", "2"]])
def test_an_option_an_exported_model_cannot_honour_is_one_error_line(kfold, tmp_path, option, cli_run):
    pytest.importorskip("onnxscript")
    from classify.deploy.export import export

    crops, run, _ = kfold
    export([run], tmp_path / "m.onnx")
    for cmd in (["predict", tmp_path / "m.onnx", crops, "--out", tmp_path / "s.csv"],
                ["evaluate", tmp_path / "m.onnx", crops],
                ["pseudo-label", tmp_path / "m.onnx", crops, "--out", tmp_path / "p"]):
        res = cli_run(*cmd, *option)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: {option[0]}"), res.stderr
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "p").exists()


def test_a_served_answer_names_its_class_in_every_task_field():
    from classify.inference.answer import task_values
    from classify.deploy.serve import Engine
    from preprocess import labels as L

    p = np.zeros(18)
    p[L.encode(0, 0, 0)], p[L.encode(1, 0, 0)], p[L.encode(1, 1, 0)] = 0.34, 0.33, 0.33  # the example
    engine = Engine.__new__(Engine)
    engine.model = dataclasses.make_dataclass("M", [("old", int)])(60)
    engine.names = L.class_names(60)
    engine.tasks = None  # the card's task names; None: rebuilt at old
    engine.mask_unlearned = False  # the card says the model has learned mask
    from preprocess.crop import CropConfig

    engine.config = CropConfig()  # the model's crop settings: the answer's `crop` square uses its margin
    choice = dataclasses.make_dataclass("C", [("status", str), ("box", tuple), ("index", object)])("ok", (0, 0, 1, 1), None)
    ans = engine.describe(p, int(p.argmax()), choice, None)
    assert ans["name"] == engine.names[L.encode(0, 0, 0)] and "warning" not in ans
    assert [ans["tasks"][t]["label"] for t in ("mask", "gender", "age")] == ["wear", "male", "<30"]
    assert ans["tasks"]["mask"]["prob"] == pytest.approx(0.34) and ans["tasks"]["gender"]["prob"] == pytest.approx(0.67)
    assert task_values(p, L.encode(1, 1, 0))["mask"] == {"label": "incorrect", "prob": pytest.approx(0.66)}


def test_with_tta_the_temperature_never_changes_the_top_class_of_the_views_mean():
    """T applied per view before the mean let a sharpening T (< 1) hand the mean to the most confident view
    (2.9 points of accuracy lost on one workload, BENCHMARKS §13); it is applied to the mean's log instead."""
    from classify.inference.answer import model_probs
    from classify.inference.calibration import apply_temperature

    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (4, 500, 18))
    plain = model_probs(z, 1.0)
    for t in (0.1, 0.3, 3.0, 10.0):
        assert (model_probs(z, t).argmax(1) == plain.argmax(1)).all()
        assert np.allclose(model_probs(z[:1], t), apply_temperature(z[0], t))  # one view: softmax(z / T)
    sharper = model_probs(z, 0.3)
    assert (sharper.max(1) > plain.max(1)).all()
