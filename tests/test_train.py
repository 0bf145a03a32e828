"""Training on synthetic crops whose classes are visible: it learns, it does not learn noise, it is
deterministic, it writes every output, and it refuses what cannot work."""
import csv
import math
import json

import numpy as np
import pytest
import torch

from classify.checkpoint import load_checkpoint
from classify.errors import ConfigError
from classify.training.config import TrainConfig, load_config, resume_config
from classify.training.train import fit
from classify.inference.card import card_of
from tests.conftest import make_crops

FAST = dict(model="resnet18", img_size=32, batch_size=32, lr=1e-3, workers=0, weights="none", device="cpu",
            preset="none", val_ratio=0.25)


def _fit(crops, out, **kw):
    return fit(TrainConfig(crops=str(crops), out=str(out), **(FAST | kw)), warn=lambda m: None)


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    return make_crops(tmp_path_factory.mktemp("crops"), people=36)


def test_learns_visible_classes_but_not_shuffled_labels(crops, tmp_path_factory):
    good = _fit(crops, tmp_path_factory.mktemp("run"), epochs=4)
    noise_crops = make_crops(tmp_path_factory.mktemp("noise"), people=36, shuffle_labels=True)
    noise = _fit(noise_crops, tmp_path_factory.mktemp("run"), epochs=4)
    assert good["best"]["val_f1"] >= 0.9, good["best"]
    assert noise["best"]["val_f1"] <= 0.35, noise["best"]


def test_run_folder_holds_everything_and_val_predictions_are_consistent(crops, tmp_path):
    out = tmp_path / "run"
    summary = _fit(crops, out, epochs=2)
    for name in ("config.json", "split.csv", "metrics.csv", "best.pt", "last.pt", "val_predictions.csv",
                 "confusion.png", "summary.json"):
        assert (out / name).is_file(), name
    with open(out / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    assert [int(m["epoch"]) for m in metrics] == [1, 2]
    assert {"train_loss", "val_loss", "val_acc", "val_f1", "val_mask_f1", "val_gender_f1", "val_age_f1"} <= set(metrics[0])
    with open(out / "split.csv") as f:
        split = {r["person_id"]: r["split"] for r in csv.DictReader(f)}
    with open(out / "val_predictions.csv") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == summary["val_photos"] and all(split[p["image_id"].split("/")[0]] == "val" for p in preds)
    probs = np.array([[float(p[f"p{k}"]) for k in range(18)] for p in preds])
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert [int(p["pred"]) for p in preds] == probs.argmax(1).tolist()
    best = load_checkpoint(out / "best.pt")
    card = card_of(best)
    assert card.name == "resnet18" and card.img_size == 32 and len(card.classes) == 18
    assert best["config"]["seed"] == 42 and "optimizer" not in best
    acc = np.mean([int(p["pred"]) == int(p["label"]) for p in preds])
    assert best["metrics"]["val_acc"] == pytest.approx(acc)
    assert json.loads((out / "config.json").read_text())["weights_resolved"] == "none"


def test_training_is_deterministic_on_the_cpu(crops, tmp_path):
    kw = dict(epochs=2, preset="strong", mix="cutmix", model="attention", img_size=32)
    _fit(crops, tmp_path / "a", **kw)
    _fit(crops, tmp_path / "b", **kw)
    assert (tmp_path / "a" / "val_predictions.csv").read_text() == (tmp_path / "b" / "val_predictions.csv").read_text()
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])


def test_resume_ends_exactly_like_an_uninterrupted_run(crops, tmp_path):
    _fit(crops, tmp_path / "full", epochs=3, workers=0)

    class Killed(Exception):
        pass

    def die_after_first_epoch(record):
        raise Killed  # the process dies after epoch 1 was saved (test_faults kills a real process mid-epoch)

    with pytest.raises(Killed):
        fit(TrainConfig(crops=str(crops), out=str(tmp_path / "cut"), **(FAST | {"epochs": 3})),
            on_epoch=die_after_first_epoch, warn=lambda m: None)
    assert len((tmp_path / "cut" / "metrics.csv").read_text().splitlines()) == 2
    fit(resume_config(tmp_path / "cut", {"workers": 0}), resume=True, warn=lambda m: None)
    full = (tmp_path / "full" / "metrics.csv").read_text().splitlines()
    cut = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    drop_time = lambda lines: [",".join(v for k, v in zip(lines[0].split(","), l.split(",")) if k != "seconds") for l in lines]
    assert drop_time(full) == drop_time(cut)


def test_config_file_and_command_line_merge(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('model = "attention"\nepochs = 7\nlr = 0.01\n')
    cfg = load_config({"crops": "x", "out": "y", "epochs": 3, "lr": None}, toml)
    assert (cfg.model, cfg.epochs, cfg.lr) == ("attention", 3, 0.01)
    toml.write_text("epoch = 7\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config({"crops": "x", "out": "y"}, toml)
    with pytest.raises(ConfigError, match="--optimizer"):
        load_config({"crops": "x", "out": "y", "optimizer": "rmsprop"})


def test_a_nan_loss_stops_training_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(crops, tmp_path,
                                                                                            monkeypatch):
    import classify.training.train as T
    from classify.errors import TrainingError

    from tests.helpers import nan_at_call

    poisoned = nan_at_call(T.make_loss, 10)  # 7 steps per epoch: step 3 of epoch 2
    monkeypatch.setattr(T, "make_loss", poisoned)
    with pytest.raises(TrainingError, match=r"epoch 2, step 3.*last.pt holds epoch 1"):
        _fit(crops, tmp_path / "r", epochs=3, batch_size=29)
    last = load_checkpoint(tmp_path / "r" / "last.pt")
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["model_state"].values() if v.is_floating_point())


def test_resume_refuses_options_that_would_change_the_run(crops, tmp_path):
    _fit(crops, tmp_path / "r", epochs=1)
    assert resume_config(tmp_path / "r", {"epochs": 4, "lr": None}).epochs == 4
    with pytest.raises(ConfigError, match="--lr"):
        resume_config(tmp_path / "r", {"lr": 0.5})
    with pytest.raises(ConfigError, match="nothing to resume"):
        resume_config(tmp_path / "absent")


def test_resume_with_more_epochs_continues_the_cosine_schedule_to_the_new_end(crops, tmp_path):
    _fit(crops, tmp_path / "r", epochs=1)
    summary = fit(resume_config(tmp_path / "r", {"epochs": 3}), resume=True, warn=lambda m: None)
    with open(tmp_path / "r" / "metrics.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert summary["epochs"] == 3 and len(lrs) == 3
    # 7 steps an epoch. The 1-epoch plan ended its cosine at 0; extended, the schedule is where a 3-epoch
    # plan (warmup 7 steps, cosine over 14) is: half-way down the cosine after epoch 2, at 0 after epoch 3.
    assert lrs[0] == pytest.approx(0, abs=1e-12)
    assert lrs[1] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 7 / 14)) / 2, rel=1e-6)
    assert lrs[2] == pytest.approx(0, abs=1e-12)


def test_weighted_sampler_evens_out_classes_and_mixing_weights_match_the_pixels():
    from classify.training.distributed import Dist
    from classify.training.mixing import epoch_order as _epoch_order
    from classify.training.mixing import mix_batch as _mix

    class DS:
        labels = torch.tensor([0] * 90 + [17] * 10)

        def __len__(self):
            return 100

    counts = np.bincount(DS.labels.numpy(), minlength=18)
    cfg = TrainConfig(crops="x", out="y", sampler="weighted")
    order = _epoch_order(cfg, 0, DS(), counts, Dist())
    rare = sum(DS.labels[i].item() == 17 for i in order)
    assert len(order) == 100 and 35 <= rare <= 65  # 10% of the data, about half of the draws
    assert order != _epoch_order(cfg, 1, DS(), counts, Dist())  # a new draw each epoch

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    y = torch.tensor([1, 2])
    mixed, y_b, lam = _mix(TrainConfig(crops="x", out="y", mix="mixup"), x, y, 0, 0, 0)
    perm = [[1, 2].index(int(v)) for v in y_b]  # the partner of each sample, read off its label
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])
    cut, y_b, lam = _mix(TrainConfig(crops="x", out="y", mix="cutmix", seed=3), x, y, 0, 0, 0)
    perm = [[1, 2].index(int(v)) for v in y_b]
    assert perm == [1, 0]  # this seed swaps the pair, so the check below has something to check
    changed = (cut != x).any(dim=1).float().mean(dim=(1, 2))  # share of pixels pasted from the partner
    for i in range(2):
        if perm[i] != i:
            assert changed[i].item() == pytest.approx(1 - lam, abs=1e-6)
