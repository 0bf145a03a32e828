"""Say only what was earned (issue 34): where two features meet, or where the model is weak or diverged, the tool
says so instead of answering with full confidence. Pure parts first (milliseconds, inputs drawn by
hypothesis), then the wiring on small synthetic runs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from classify.errors import CheckpointError, TrainingError
from classify.inference.answer import answer, combine
from classify.inference.calibration import calibrate, ece, fit_temperature
from classify.inference.card import ModelCard, card_of
from classify.metrics import not_learned_caution, unlearned_tasks
from preprocess import labels as L
from tests.conftest import make_crops

FAST = dict(model="resnet18", img_size=32, batch_size=32, workers=0, weights="none", device="cpu", preset="none",
            val_ratio=0.25)

probs_m_n = st.integers(1, 5).flatmap(lambda m: st.integers(1, 6).flatmap(
    lambda n: arrays(np.float64, (m, n, 18), elements=st.floats(0.001, 1.0))))


def _normalised(p):
    return p / p.sum(-1, keepdims=True)


# -- the hard vote and its tie-break; shares never read as probabilities -------------------------------------

@settings(max_examples=200, deadline=None)
@given(probs_m_n)
def test_hard_vote_is_the_majority_with_ties_to_the_highest_mean_probability(p):
    p = _normalised(p)
    mean, labels, votes = combine(p, "hard")
    assert np.allclose(mean, p.mean(0)) and np.allclose(votes.sum(1), 1.0)
    for i, y in enumerate(labels):
        tops = p[:, i].argmax(1)
        counts = np.bincount(tops, minlength=18)
        assert counts[y] == counts.max()  # a majority class ...
        tied = np.flatnonzero(counts == counts.max())
        assert mean[i, y] == mean[i, tied].max()  # ... and of the tied ones the likeliest on average


@settings(max_examples=200, deadline=None)
@given(probs_m_n, st.sampled_from(["soft", "hard"]))
def test_an_answers_confidence_is_the_mean_probability_of_its_class_never_a_vote_share(p, vote):
    p = _normalised(p)
    ans = answer([np.log(m) for m in p], [1.0] * len(p), vote=vote)
    assert np.allclose(ans.scores, p.mean(0))  # scores are probabilities whatever the vote
    assert np.allclose(ans.confidence, p.mean(0)[np.arange(p.shape[1]), ans.labels])
    assert (ans.confidence <= ans.scores.max(1) + 1e-12).all()
    if vote == "hard" and len(p) == 1:
        assert (ans.votes.max(1) == 1.0).all()  # one model's share is 1 for every photo: no probability


def test_one_unsure_model_under_a_hard_vote_keeps_no_pseudo_label_at_09(tmp_path):
    """The reported case: one model, --vote hard --min-prob 0.9 kept 16 of 16 photos (its share 1.0 each)."""
    from classify.inference.submission import conclude

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 0.3, (1, 16, 18))  # an unsure model: top probabilities around 0.1
    ans = answer([logits], [1.0], vote="hard")
    rows = [{"image_id": f"{k}.jpg", "status": "ok"} for k in range(16)]
    pred = conclude(rows, ans.scores, ans.labels, tmp_path, [], 60, ["m"], None, None, tmp_path / "review.csv",
                    0.9, ans.votes)
    assert (pred.confidence < 0.9).all()
    with open(tmp_path / "review.csv") as f:
        assert len(f.readlines()) == 1 + 16  # every photo is unsure, so every one is listed for review


# -- calibration and ECE on non-finite input; the calibration line --------------------------------------------

@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, (12, 18), elements=st.floats(-30, 30)), st.integers(0, 11),
       st.sampled_from([np.nan, np.inf, -np.inf]))
def test_calibration_and_ece_refuse_non_finite_logits(z, row, bad):
    y = np.arange(12) % 18
    z = z.copy()
    z[row, row % 18] = bad
    for fn in (lambda: calibrate(z, y), lambda: fit_temperature(z, y), lambda: ece(z, y)):
        with pytest.raises(CheckpointError, match="not finite for 1 of 12"):
            fn()


def test_the_calibration_line_says_what_was_fitted_and_what_is_applied():
    from cli_commands.train import calibration_line

    c = {"temperature": 1.0, "fitted": 20.0, "photos": 14, "ece_before": 0.2691, "ece_after": 0.2691,
         "kept": "T = 1 kept: the fit landed on the edge of 0.05..20 (T = 20): too few or too easy photos"}
    line = calibration_line(c)
    assert f"T = {c['fitted']:.3g} fitted on 14 validation photos but not trusted" in line
    assert "T = 1 applied" in line and "unchanged" in line and "after" not in line
    applied = {"temperature": 1.7, "fitted": 1.7, "photos": 40, "ece_before": 0.2, "ece_after": 0.05}
    assert calibration_line(applied) == ("calibration: T = 1.7 fitted on 40 validation photos and applied; expected "
                                         "calibration error 0.2000 before, 0.0500 after")


# -- the card: round trip, newer versions refused ------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["resnet18", "attention", "mobilenet_v2"]), st.integers(32, 384), st.integers(31, 90),
       st.floats(0.05, 20), st.lists(st.floats(0.01, 1), min_size=3, max_size=3))
def test_a_card_reads_back_as_written_and_a_newer_one_is_refused(name, size, old, t, mean):
    card = ModelCard(name, {"backbone": "resnet18"} if name == "attention" else {}, size, mean=tuple(mean), old=old,
                     calibration={"temperature": t}, validation={"on": "validation", "not_learned": {"age": [0.4, 0.5]}})
    back = card_of(json.loads(json.dumps({"card": card.to_dict()})))
    assert back == card and back.classes == L.class_names(old) and back.temperature == t
    assert "age" in back.caution
    with pytest.raises(CheckpointError, match="newer than this maskcls reads"):
        card_of({"card": card.to_dict() | {"version": card.version + 1}})


# -- a task not learned ---------------------------------------------------------------------------------------

def test_a_constant_model_has_learned_no_task_and_a_perfect_one_every_task():
    rng = np.random.default_rng(1)
    y = np.array([L.encode(rng.integers(3), rng.integers(2), rng.integers(3)) for _ in range(300)])
    assert set(unlearned_tasks(y, np.zeros_like(y))) == {"mask", "gender", "age"}
    assert unlearned_tasks(y, y) == {}
    caution = not_learned_caution(unlearned_tasks(y, np.zeros_like(y)))
    assert caution.startswith("the model has not learned mask, gender, age")


def test_gender_is_judged_per_person_not_per_photo():
    """The audit issue's case: per photo the gender accuracy cleared the majority bar, per person it did not."""
    people = [f"p{k}" for k in range(12) for _ in range(7)]
    g = np.array([int(k < 7) for k in range(12) for _ in range(7)])  # 7 women, 5 men: majority 7/12
    pred_g = g.copy()
    for k in range(6):  # six people wrong in 4 of their 7 photos: wrong as people, mostly right as photos
        pred_g[7 * k:7 * k + 4] = 1 - pred_g[7 * k:7 * k + 4]
    y, p = 3 * g, 3 * pred_g  # 6 mask + 3 gender + age group, mask and age 0
    assert (pred_g == g).mean() == pytest.approx(60 / 84) and 60 / 84 > 49 / 84  # per photo: learned, it seems
    assert "gender" not in unlearned_tasks(y, p)
    assert unlearned_tasks(y, p, people)["gender"] == pytest.approx((0.5, 7 / 12))  # per person: not


# -- divergence -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["ce", "wce", "smooth"])
def test_a_diverging_run_stops_with_one_line_and_no_best_pt(tmp_path, cli_run, loss):
    crops = make_crops(tmp_path / "c", people=12, size=16)
    res = cli_run("train", crops, "--out", tmp_path / "r", "--lr", "1e6", "--loss", loss, "--epochs", "2",
                  "--img-size", "32", "--workers", "0", "--weights", "none", "--device", "cpu", "--preset", "none",
                  timeout=300)
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert len(errors) == 1 and "Try a lower --lr" in errors[0], res.stderr
    assert "diverged at epoch 1" in errors[0] and "Traceback" not in res.stdout + res.stderr
    assert "RuntimeWarning" not in res.stdout + res.stderr
    assert not (tmp_path / "r" / "best.pt").exists()


def test_the_guard_stops_a_loss_that_grows_far_beyond_its_first_steps_and_not_one_that_wobbles():
    import torch

    from classify.training import epoch as E

    class T:
        d = type("D", (), {"world": 1, "max": lambda self, flag: float(flag.item())})()  # one process

    guard = E._LossGuard(False, [])
    for step, v in enumerate([2.9, 2.5, 3.3, 2.0, 2.8, 2.9 * E.DIVERGE_FACTOR * 0.9]):  # a wobble under the rule
        assert guard.check(T, torch.tensor(v), 0, step)
    with pytest.raises(TrainingError, match="diverged at epoch 1, step 8"):
        guard.check(T, torch.tensor(2.9 * E.DIVERGE_FACTOR * 1.5), 0, 7)
    with pytest.raises(TrainingError, match="the loss became nan"):
        E._LossGuard(False, [2.9]).check(T, torch.tensor(float("nan")), 0, 1)
    scaled = E._LossGuard(True, [2.9])  # fp16: an inf loss is a step the scaler skips, not growth
    assert scaled.check(type("S", (), {"d": T.d, "scaler": None})(), torch.tensor(float("inf")), 0, 3) is False


def test_validation_with_non_finite_logits_stops_the_run():
    from classify.training.epoch import _finite_validation

    _finite_validation(np.zeros((3, 18)), 2.0, 0)
    with pytest.raises(TrainingError, match="diverged at epoch 2: 1 of 3 validation photos got non-finite logits"):
        _finite_validation(np.array([[0.0] * 18, [np.nan] * 18, [1.0] * 18]), 2.0, 1)
    with pytest.raises(TrainingError, match="the validation loss is nan"):
        _finite_validation(np.zeros((3, 18)), math.nan, 0)


# -- the weak run's caution, the label fixes' count, evaluate on training people -----------------------------

@pytest.fixture(scope="module")
def weak_run(tmp_path_factory):
    """A 1-epoch run on 16 people: it has learned nothing (F1 near 0)."""
    from classify.training.config import TrainConfig
    from classify.training.train import fit

    base = tmp_path_factory.mktemp("weak")
    crops = make_crops(base / "c", people=16, size=16)
    fixes = base / "fixes.csv"
    fixes.write_text("image_id,field,value\n0000,gender,1\n0001,gender,1\n0002/normal,mask,0\n")
    summary = fit(TrainConfig(crops=str(crops), out=str(base / "r"), epochs=1, lr=1e-4, label_fixes=str(fixes),
                              **FAST), warn=lambda m: None)
    return crops, base / "r", summary


def test_a_weak_run_is_cautioned_in_its_summary_card_and_predictions(weak_run, tmp_path):
    from classify.inference.card import card_of_run
    from classify.inference.predictor import predict

    crops, run, summary = weak_run
    assert summary["validation"]["not_learned"]  # recorded per task
    caution = card_of_run(run).caution
    assert caution and caution.startswith("the model has not learned")
    pred = predict([run], crops, None, device="cpu", workers=0)
    assert caution in pred.warnings


def test_label_fixes_say_how_many_labels_they_changed(weak_run):
    _, _, summary = weak_run
    f = summary["label_fixes"]
    # person 0000 is a man (p % 2): 7 photos change; 0001 is already a woman: none; one photo's mask changes
    assert (f["fixes"], f["photos"], f["changed"], f["people"]) == (3, 15, 8, 2)


def test_evaluate_on_training_people_says_so(weak_run):
    from classify.inference.evaluate import evaluate
    from classify.inference.rundir import read_split

    crops, run, _ = weak_run
    res = evaluate([run], crops, device="cpu", workers=0)
    trained = sum(1 for v in read_split(run).values() if v == "train")
    w, caution = res["warnings"]
    assert f"({trained} people) show people the model trained on" in w
    # evaluate's table of accuracies read as skill where they were chance: it now says which tasks are no better
    # than always answering the most common label on the photos it scored (mask per photo, the rest per person)
    assert res["not_learned"] and set(res["not_learned"]) <= {"mask", "gender", "age"}
    mask = res["not_learned"].get("mask")
    if mask:  # per photo: the table's own mask accuracy
        assert mask[0] == pytest.approx(res["scores"]["mask_acc"])
    assert caution.startswith(f"the model has not learned {', '.join(res['not_learned'])}: on these {res['n']} photos")


# -- a newer card is refused by every reader; class names come from the card ---------------------------------

def test_pseudo_label_names_classes_at_the_models_own_old(weak_run, tmp_path):
    from classify.checkpoint import load_checkpoint, save_checkpoint
    from classify.inference.pseudo import pseudo_label

    crops, run, _ = weak_run
    ckpt = load_checkpoint(run / "best.pt")
    card = card_of(ckpt)
    save_checkpoint(tmp_path / "old58.pt", ckpt | {"card": card.to_dict() | {"old": 58, "classes": L.class_names(58),
                                                                             "tasks": None}})
    res = pseudo_label([tmp_path / "old58.pt"], crops, tmp_path / "p", min_prob=0.01, device="cpu", workers=0)
    assert res.classes == L.class_names(58) and "wear/male/30-57" in res.classes
    save_checkpoint(tmp_path / "new.pt", ckpt | {"card": card.to_dict() | {"version": 99}})
    with pytest.raises(CheckpointError, match="newer"):
        pseudo_label([tmp_path / "new.pt"], crops, tmp_path / "q", device="cpu", workers=0)


def test_an_edited_crop_voids_the_pack_so_both_backends_read_the_same_pixels(tmp_path):
    import os

    from preprocess.imageio import atomic_write_bytes, encode_jpeg
    from preprocess.manifest import packed_crops, read_manifest

    crops = make_crops(tmp_path / "c", people=2, size=16)
    assert packed_crops(crops) is not None
    r = read_manifest(crops)[3]
    atomic_write_bytes(crops / r["crop"], encode_jpeg(np.zeros((16, 16, 3), np.uint8)))
    os.utime(crops / r["crop"], ns=(1, 1))
    assert packed_crops(crops) is None  # the torch backend now decodes the JPEGs, as the ONNX one does


def test_pseudo_labels_of_a_model_that_has_not_learned_are_named_as_guesses_where_made_and_used(weak_run, tmp_path):
    """pseudo-label wrote a weak model's answers as labels, and `train --extra` took them like any labels: the
    caution printed at pseudo-label time was gone by training time. The folder now records the tasks the model had
    not learned, and both commands say what those labels are."""
    from classify.data.dataset import extra_rows, load_rows
    from classify.inference.pseudo import pseudo_label
    from classify.training.config import TrainConfig
    from preprocess.manifest import read_meta

    crops, run, summary = weak_run
    unlearned = list(summary["validation"]["not_learned"])
    assert unlearned
    other = make_crops(tmp_path / "eval", people=3, size=16, seed=7)  # photos outside the training crops
    res = pseudo_label([run], other, tmp_path / "p", min_prob=0.01, device="cpu", workers=0)
    assert res.kept == 21
    assert read_meta(tmp_path / "p")["pseudo"]["unlearned"] == unlearned
    said = [w for w in res.warnings if "labels are the guesses of a model that has not learned" in w]
    assert said and said[0].startswith(f"{tmp_path / 'p'}: its {'/'.join(unlearned)} labels")
    warnings: list[str] = []
    cfg = TrainConfig(crops=str(crops), out=str(tmp_path / "r"), extra=(str(tmp_path / "p"),), **FAST)
    rows = extra_rows(cfg, load_rows(crops, cfg.old)[1], warnings)
    assert len(rows) == 21
    assert [w for w in warnings if w.startswith(f"--extra {tmp_path / 'p'}: its {'/'.join(unlearned)} labels are the guesses")]


def test_training_above_the_crops_size_says_every_crop_is_upscaled(tmp_path):
    """`crop --size 64` then `train --img-size 128` trained on crops blown up 2x, in silence."""
    from classify.data.dataset import prepare_data
    from classify.training.config import TrainConfig

    crops = make_crops(tmp_path / "c", people=6, size=16)
    said = lambda img: [w for w in prepare_data(TrainConfig(crops=str(crops), out="x", **(FAST | {"img_size": img}))).warnings  # noqa: E731
                        if "every crop is upscaled" in w]
    assert said(32) == ["--img-size 32 is larger than the crops (16 px, `maskcls crop --size 16`): every crop is "
                        "upscaled, which adds compute and no detail; crop again with --size 32 or more, or train at "
                        "--img-size 16"]
    assert said(16) == [] and said(12) == []


def test_an_extra_folder_cropped_otherwise_than_the_training_crops_is_named(tmp_path):
    """`train CROPS --extra X` where X was cut at another size or margin (a pseudo-label folder of a model trained
    on other crops) mixed two framings into training, in silence."""
    import json

    from classify.data.dataset import extra_rows, load_rows
    from classify.training.config import TrainConfig

    crops, extra = make_crops(tmp_path / "c", people=4, size=16), make_crops(tmp_path / "x", people=3, size=16, seed=9)
    for folder, key in ((crops, "k-main"), (extra, "k-main")):
        meta = json.loads((folder / "crops.json").read_text())
        (folder / "crops.json").write_text(json.dumps(meta | {"key": key}))
    cfg = TrainConfig(crops=str(crops), out=str(tmp_path / "r"), extra=(str(extra),), **FAST)
    said = lambda: [w for w in warned() if "was cropped with other settings" in w]  # noqa: E731

    def warned():
        warnings: list[str] = []
        extra_rows(cfg, load_rows(crops, cfg.old)[1], warnings)
        return warnings

    assert said() == []
    meta = json.loads((extra / "crops.json").read_text())
    (extra / "crops.json").write_text(json.dumps(meta | {"key": "k-other"}))
    assert said() == [f"--extra {extra} was cropped with other settings than {crops}: its photos are framed otherwise "
                      "than those validation and predict see (crop size, margin or detector; key k-other vs k-main); "
                      "crop (or pseudo-label) them with the training crops' settings"]


def test_amp_asked_for_on_the_cpu_says_the_run_trains_in_fp32(tmp_path):
    """`train --amp fp16 --device cpu` recorded amp fp16 and trained in fp32, in silence."""
    from classify.training.config import TrainConfig
    from classify.training.train import fit

    crops = make_crops(tmp_path / "c", people=6, size=16)
    said = {}
    for amp in ("fp16", "off"):
        summary = fit(TrainConfig(crops=str(crops), out=str(tmp_path / amp), epochs=1, **(FAST | {"img_size": 16, "amp": amp})),
                      warn=lambda m: None)
        said[amp] = [w for w in summary["warnings"] if w.startswith("--amp")]
    assert said == {"fp16": ["--amp fp16 on cpu: mixed precision runs on CUDA only, so this run trains in fp32 "
                             "(config.json's amp_resolved says off)"], "off": []}
