"""Prediction: a model (checkpoints, run folders, or one exported .onnx) + eval photos (or a crops folder)
→ the answer per photo, and the submission CSV.

One path for both backends (backends.py): raw photos are cropped with the settings and face prior the
training crops were made with (`cropping.crops_for`, cached like `crop`), the backend returns each
model's logits for the crops (its own eval transform and normalisation), and `answer.answer` turns them
into probabilities and classes (the views' mean probability, then the temperature, then a soft or hard vote). Validation during
training used the same dataset class, eval transform and `engine.infer`, so the validation score is the
score of this code path. This module imports no torch: an exported model predicts without it.
"""
from __future__ import annotations

from pathlib import Path

from preprocess.layouts import LayoutError
from preprocess.manifest import read_manifest, read_meta
from preprocess.runtime import check_device

from classify.errors import ConfigError
from classify.inference.answer import answer, check_vote
from classify.inference.backends import open_backend
from classify.inference.card import cautions
from classify.inference.cropping import crops_for
from classify.inference.submission import Prediction, conclude


def check_infer_options(tta: int, batch_size: int, workers: int | None) -> None:
    """The options of predict, evaluate and pseudo-label, refused before any work when they cannot work."""
    for name, value, ok, allowed in (
            ("tta", tta, 1 <= tta <= 4, "1..4 views (1 the crop, 2 + mirror, 3 + zoom, 4 + zoomed mirror)"),
            ("batch-size", batch_size, batch_size >= 1, ">= 1"), ("workers", workers, workers is None or workers >= 0, ">= 0")):
        if not ok:
            raise ConfigError(f"--{name} {value}: must be {allowed}")


def other_cropping(crops: Path, crop_meta: dict, what: str, remedy: str) -> list[str]:
    """The warning for a crops folder cropped otherwise than the model's training crops (crops.json's key: the
    detector's settings, crop size and margin), or none."""
    given_key, trained_key = read_meta(crops).get("key"), crop_meta.get("key")
    if given_key and trained_key and given_key != trained_key:
        return [f"{crops} was cropped with other settings than the training crops (key {given_key} vs {trained_key}): "
                f"{what} may be worse than validation said; {remedy}"]
    return []


def predict(models: list[Path], source: Path, out: Path | None = None, tta: int = 1, probs_out: Path | None = None,
            cache: Path | None = None, device: str = "auto", batch_size: int = 64, workers: int | None = None,
            detector=None, on_progress=None, vote: str = "soft", calibrate: bool = True,
            review: Path | None = None, below: float = 0.5, backend=None) -> Prediction:
    """Predict every photo of `source` (an eval folder with info.csv, or a crops folder) and write the
    submission `ImageID,ans` in info.csv's (or the manifest's) order. `models`: checkpoints or run folders
    (a k-fold run folder stands for every fold's best.pt), or one exported .onnx. Several models are
    combined by `vote` (soft: mean probability; hard: majority of their top classes).

    >>> predict([Path("run/best.pt")], Path("data_samples/eval"), Path("submission.csv"), tta=2)
    >>> predict([Path("runs/kfold")], Path("eval"), Path("submission.csv"), vote="hard")
    >>> predict([Path("model.onnx")], Path("eval"), Path("submission.csv"))

    `backend`: a model already opened (`backends.open_backend`, as `classify.load` holds one); `models` is
    then ignored.
    """
    check_infer_options(tta, batch_size, workers)
    check_device(device)
    if not 0 < below <= 1:
        raise ConfigError(f"--below {below}: must be in (0, 1] (a probability)")
    check_vote(vote)
    if backend is None:
        backend = open_backend(models, device, workers, tta)
    else:
        backend.check_options(tta)  # refused before any work, as open_backend refuses
    crop = backend.card.crop
    crops, warnings = crops_for(Path(source), crop, cache, backend.crop_device(device), detector, on_progress)
    warnings += other_cropping(crops, crop, "predictions", "pass the raw folder to crop it the training way")
    warnings += cautions(backend.cards)  # a model that has not learned
    rows = read_manifest(crops)
    for i, r in enumerate(rows):
        r["index"] = i
    if not rows:
        raise LayoutError(f"{source} holds no photo to predict")
    ans = answer(backend.logits(crops, rows, tta, batch_size), backend.temperatures, calibrate, vote)
    pred = conclude(rows, ans.scores, ans.labels, crops, warnings, backend.card.old, backend.names, out, probs_out,
                    review, below, ans.votes, list(backend.card.classes))
    pred.unlearned = tuple(dict.fromkeys(t for c in backend.cards for t in c.unlearned))
    return pred

