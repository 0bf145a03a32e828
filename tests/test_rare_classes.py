"""Issue 16: synthetic masks drawn from landmarks, pseudo-labels that only ever train, and the CutMix
that keeps labels (vcutmix); each recorded in the run's config and checkpoint."""
import json

import numpy as np
import pytest
import torch

from classify.checkpoint import load_checkpoint
from classify.data.dataset import CropDataset
from classify.data.masks import face_box, synthesize
from classify.inference.predictor import predict
from classify.inference.pseudo import pseudo_label
from classify.training.config import TrainConfig
from classify.data.dataset import prepare_data
from classify.training.mixing import mix_batch as _mix
from classify.training.train import fit
from classify.data.transforms import build_transform
from preprocess import labels as L
from preprocess.manifest import read_manifest, write_manifest
from tests.conftest import make_crops

# A frontal face in a 256 x 256 crop: eyes, nose, mouth corners.
PTS = np.array([[100, 100], [156, 100], [128, 135], [105, 165], [151, 165]], float)
FAST = dict(model="resnet18", img_size=32, batch_size=16, lr=1e-3, workers=0, weights="none", device="cpu",
            preset="none", val_ratio=0.25, epochs=1)


def _changed(a, b):
    return np.abs(a.astype(int) - b.astype(int)).max(2) > 12


def test_a_synthetic_mask_covers_the_lower_face_and_relabels_as_documented():
    img = np.full((256, 256, 3), 128, np.uint8)
    label = L.encode(2, 1, 0)  # not wear / female / <30
    x1, _, x2, y2 = face_box(PTS)
    kinds = {}
    for seed in range(40):
        out, new = synthesize(img, PTS, label, np.random.default_rng(seed))
        mask, gender, age = L.decode(new)
        assert (gender, age) == (1, 0) and mask in (0, 1)  # the person's labels stay; the mask status changes
        ch = _changed(out, img)
        ys, xs = np.nonzero(ch)
        assert ch[165, 128]                                     # the mouth is covered
        assert not ch[:int(PTS[:2, 1].mean()) + 1].any()        # nothing at or above the eyes
        assert xs.min() >= x1 - 8 and xs.max() <= x2 + 8 and ys.max() <= y2 + 0.15 * (x2 - x1)  # to just below the chin
        # wear covers the nose; incorrect sits below it (the nose tip stays bare)
        assert ch[int(PTS[2, 1]), int(PTS[2, 0])] == (mask == 0)
        kinds[mask] = kinds.get(mask, 0) + 1
    assert kinds[0] >= 10 and kinds[1] >= 10  # both kinds, about half each (SYNTH_INCORRECT = 0.5)
    with pytest.raises(ValueError, match="unmasked"):
        synthesize(img, PTS, L.encode(0, 1, 0), np.random.default_rng(0))


def test_training_draws_masks_on_unmasked_crops_only_with_their_probability(tmp_path):
    crops = make_crops(tmp_path / "c", people=4, size=256)
    rows = read_manifest(crops)
    for i, r in enumerate(rows):
        r["index"], r["landmarks"] = i, PTS.ravel().tolist()
    tf = build_transform("none", 64, True)
    always = CropDataset(crops, rows, tf, seed=1, synth_mask=1.0)
    never = CropDataset(crops, rows, tf, seed=1, synth_mask=0.0)
    half = CropDataset(crops, rows, tf, seed=1, synth_mask=0.5)
    drawn = 0
    for i, r in enumerate(rows):
        y_always, y_never, y_half = int(always[i][1]), int(never[i][1]), int(half[i][1])
        assert y_never == r["label"]
        if r["mask"] != 2:
            assert y_always == y_half == r["label"]  # masked photos are never touched
            assert torch.equal(always[i][0], never[i][0])
            continue
        m, g, a = L.decode(y_always)
        assert m in (0, 1) and (g, a) == L.decode(r["label"])[1:]
        assert not torch.equal(always[i][0], never[i][0])
        assert int(always[i][1]) == y_always  # deterministic per (seed, epoch, photo)
        drawn += y_half != r["label"]
    assert 0 < drawn < 4  # P = 0.5 over the four unmasked photos: some, not all (seeded)


@pytest.fixture
def pseudo(tmp_path):
    """A model trained on one set of people, and its pseudo-labels for a crops folder of other people."""
    train = make_crops(tmp_path / "train", people=12, seed=0)
    run = tmp_path / "run"
    fit(TrainConfig(crops=str(train), out=str(run), **FAST), warn=lambda m: None)
    evalc = make_crops(tmp_path / "eval", people=6, seed=5)
    return train, run, evalc


def test_pseudo_labels_carry_their_probability_and_keep_only_the_confident(pseudo, tmp_path):
    train, run, evalc = pseudo
    pred = predict([run / "best.pt"], evalc, device="cpu", workers=0)
    top = pred.probs.max(1)
    threshold = float(np.median(top))
    res = pseudo_label([run / "best.pt"], evalc, tmp_path / "ps", min_prob=threshold, device="cpu", workers=0)
    rows = read_manifest(tmp_path / "ps")
    expect = {r["image_id"]: (float(p), int(y)) for r, p, y in zip(pred.rows, top, pred.labels) if p >= threshold}
    assert res.kept == len(rows) == len(expect) and 0 < len(rows) < len(pred.rows)
    for r in rows:
        p, y = expect[r["image_id"]]
        assert r["prob"] == pytest.approx(p, abs=1e-6) and f"p={p:.4f}" in r["reason"]
        assert r["label"] == y and L.age_group(r["age"], 60) == r["age_group"] == L.decode(y)[2]
        assert r["person_id"] == f"pseudo:{r['image_id']}"
        assert (tmp_path / "ps" / r["crop"]).is_file()
    assert len({r["person_id"] for r in rows}) == len(rows)


def test_pseudo_label_rows_train_and_never_validate_and_every_option_is_recorded(pseudo, tmp_path):
    train, run, evalc = pseudo
    pseudo_label([run / "best.pt"], evalc, tmp_path / "ps", min_prob=0.01, device="cpu", workers=0)
    n_extra = len(read_manifest(tmp_path / "ps"))
    for seed, folds, fold in ((1, 0, 0), (2, 3, 0), (3, 3, 2)):
        cfg = TrainConfig(crops=str(train), out=str(tmp_path / "x"), **(FAST | {"seed": seed, "folds": folds, "fold": fold}),
                          extra=(str(tmp_path / "ps"),))
        data = prepare_data(cfg)
        assert not [r for r in data.val_rows if r["person_id"].startswith("pseudo:")]
        assert sum(r["person_id"].startswith("pseudo:") for r in data.train_rows) == data.extra == n_extra
    out = tmp_path / "run2"
    summary = fit(TrainConfig(crops=str(train), out=str(out), **(FAST | {"mix": "vcutmix"}), synth_mask=0.3,
                              extra=(str(tmp_path / "ps"),)), warn=lambda m: None)
    assert summary["extra_photos"] == n_extra and summary["val_photos"] == len(prepare_data(
        TrainConfig(crops=str(train), out=str(out), **FAST)).val_rows)
    split = (out / "split.csv").read_text().splitlines()
    assert sum(line.endswith(",extra") for line in split) == n_extra
    val_ids = {line.split(",")[0] for line in (out / "val_predictions.csv").read_text().splitlines()[1:]}
    assert not any(i.startswith("pseudo") for i in val_ids)
    for saved in (load_checkpoint(out / "best.pt")["config"], json.loads((out / "config.json").read_text())):
        assert saved["synth_mask"] == 0.3 and saved["mix"] == "vcutmix" and list(saved["extra"]) == [str(tmp_path / "ps")]


def test_an_extra_folder_pseudo_labelled_at_another_old_is_refused(pseudo, tmp_path):
    from classify.errors import ConfigError

    train, run, evalc = pseudo
    pseudo_label([run / "best.pt"], evalc, tmp_path / "ps", min_prob=0.01, device="cpu", workers=0)
    with pytest.raises(ConfigError, match="pseudo-labelled with --old 60"):
        prepare_data(TrainConfig(crops=str(train), out=str(tmp_path / "x"), **FAST, old=58, extra=(str(tmp_path / "ps"),)))


def _batch(labels):
    n = len(labels)
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 4, 8).clone()
    return x, torch.tensor(labels)


@pytest.mark.parametrize("mode", ["vcutmix", "vcutmix-class"])
def test_vcutmix_takes_halves_of_a_same_status_photo_and_mixes_the_label_only_where_classes_differ(mode):
    labels = [0, 4, 0, 10, 16, 17, 3, 1]  # mask status: 0 0 0 1 2 2 0 0; class 10 is alone in its status
    x, y = _batch(labels)
    cfg = TrainConfig(crops="c", out="o", mix=mode)
    for step in range(5):
        mixed, y_b, lam = _mix(cfg, x, y, 0, step, 0)
        assert lam == 0.5
        for i in range(len(labels)):
            left, right = mixed[i, :, :, :4].unique(), mixed[i, :, :, 4:].unique()
            assert len(left) == len(right) == 1  # each half comes whole from one photo
            halves = {int(left), int(right)}
            assert i in halves
            j = (halves - {i}).pop() if len(halves) == 2 else i
            assert int(y_b[i]) == labels[j]
            assert L.task_parts(labels[j])[0] == L.task_parts(labels[i])[0]  # the mask status is never mixed
            if mode == "vcutmix-class":
                assert labels[j] == labels[i]
        assert torch.equal(mixed[3], x[3]) and int(y_b[3]) == 10  # no partner: the photo stays whole
    # the mixed loss: where the partner has the same class it is that class's loss
    from classify.training.losses import MultiTaskLoss, make_loss
    heads = ["label", "mask", "gender", "age"]
    crit = MultiTaskLoss({h: make_loss("ce", 0.1, 2.0, None) for h in heads}, heads, "fixed")
    out = {h: torch.randn(len(labels), n) for h, n in (("label", 18), ("mask", 3), ("gender", 2), ("age", 3))}
    _, plain = crit(out, y)
    _, mixed_parts = crit(out, y, y_b, 0.5)
    assert torch.allclose(mixed_parts["mask"], plain["mask"])
    if mode == "vcutmix-class":
        assert all(torch.allclose(mixed_parts[h], plain[h]) for h in heads)


def test_vcutmix_is_a_train_option_and_a_bad_synth_mask_is_refused():
    from classify.errors import ConfigError

    with pytest.raises(ConfigError, match="--synth-mask 1.5"):
        TrainConfig(crops="c", out="o", synth_mask=1.5).check()
    with pytest.raises(ConfigError, match="vcutmix"):
        TrainConfig(crops="c", out="o", mix="hcutmix").check()


def test_the_report_previews_synthetic_masks_with_their_new_classes(tmp_path):
    import csv

    from classify.study.report import report
    from preprocess.manifest import read_meta

    crops = make_crops(tmp_path / "c", people=4, size=256)
    rows = read_manifest(crops)
    for r in rows:
        r["landmarks"] = PTS.ravel().tolist()
    write_manifest(crops, rows, read_meta(crops))
    report(crops, tmp_path / "rep")
    with open(tmp_path / "rep" / "synth_masks.csv") as f:
        shown = list(csv.DictReader(f))
    names = L.class_names()
    assert len(shown) == 4  # the four unmasked photos
    for r in shown:
        before, after = names.index(r["class"]), names.index(r["class_with_synthetic_mask"])
        assert L.decode(before)[0] == 2 and L.decode(after)[0] in (0, 1)
        assert L.decode(before)[1:] == L.decode(after)[1:]
    assert (tmp_path / "rep" / "synth_masks.png").is_file()
