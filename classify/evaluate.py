"""Evaluation of checkpoint(s) on a labelled crops folder: accuracy and macro F1 of the 18 classes and
per task, per-class F1, the confusion matrix. It predicts with `predict.ensemble_probs`, the same
path as `predict` and as validation during training."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocess import labels as L

from .checkpoint import load_checkpoint
from .rundir import ModelSpec
from .data import load_rows
from .errors import ConfigError
from .metrics import confusion, per_class_f1, scores
from .onnx_model import is_onnx
from .engine import check_infer_options
from .calibration import apply_temperature, ece
from .predict import check_ensemble, checkpoint_paths, combine, describe_models, model_probs
from .plots import plot_confusion
from preprocess.runtime import check_device, resolve_device


def evaluate(checkpoints: list[Path], crops: Path, tta: int = 1, device: str = "auto", batch_size: int = 64,
             workers: int = 2, confusion_png: Path | None = None, vote: str = "soft", calibrate: bool = True) -> dict:
    """{'scores': {...}, 'per_class_f1': [...], 'confusion': 18x18, 'n': photos} for the labelled
    photos of `crops` (the trainable statuses, `manifest.TRAINABLE`). Labels are taken at the
    checkpoints' `val_old` (60, the competition's boundary, unless training said otherwise), whatever
    `old` they were trained with: the score is the competition's."""
    check_infer_options(tta, batch_size, workers)
    check_device(device)
    if any(is_onnx(c) for c in checkpoints):
        return _evaluate_onnx(checkpoints, Path(crops), tta, batch_size, confusion_png)
    paths = checkpoint_paths(checkpoints)
    ckpts = [load_checkpoint(p) for p in paths]
    check_ensemble(ckpts)
    old = ModelSpec.of(ckpts[0]).val_old
    _, rows = load_rows(Path(crops), old)
    if not rows:
        raise ConfigError(f"{crops} has no labelled photo to evaluate (an eval folder's labels are unknown)")
    raw = model_probs(ckpts, Path(crops), rows, resolve_device(device), tta, batch_size, workers, calibrate=False)
    calibrated = np.stack([apply_temperature(m, ModelSpec.of(c).temperature) for m, c in zip(raw, ckpts)])
    _, p = combine(calibrated if calibrate else raw, vote)
    y = np.array([r["label"] for r in rows])
    before, after = combine(raw, "soft")[0], combine(calibrated, "soft")[0]
    cm = confusion(y, p, L.NUM_CLASSES)
    models = describe_models(paths, ckpts)
    if confusion_png:
        plot_confusion(Path(confusion_png), cm, L.class_names(old),
                       f"{Path(crops).name}, {len(rows)} photos\n{', '.join(models)}; tta {tta}, vote {vote}", blocks=6)
    return {"scores": scores(y, p), "per_class_f1": per_class_f1(y, p, L.NUM_CLASSES).tolist(),
            "confusion": cm.tolist(), "n": len(rows), "class_names": L.class_names(old), "models": models,
            "ece_before": ece(before, y), "ece_after": ece(after, y),
            "temperatures": [ModelSpec.of(c).temperature for c in ckpts]}


def _evaluate_onnx(models: list[Path], crops: Path, tta: int, batch_size: int, confusion_png: Path | None) -> dict:
    """`evaluate` of one exported model (its graph holds the calibration: the ECE is of its output)."""
    from .deploy import onnx_probs
    from .onnx_model import OnnxModel

    if len(models) != 1 or tta != 1:
        raise ConfigError("an exported model is evaluated alone and with --tta 1 (its graph holds one view)")
    model = OnnxModel(models[0])
    old = int(model.meta.get("val_old", L.DEFAULT_OLD))
    _, rows = load_rows(crops, old)
    if not rows:
        raise ConfigError(f"{crops} has no labelled photo to evaluate (an eval folder's labels are unknown)")
    probs = onnx_probs(model, crops, rows, batch_size)
    y, p = np.array([r["label"] for r in rows]), probs.argmax(1)
    cm = confusion(y, p, L.NUM_CLASSES)
    name = [f"{Path(models[0]).name} ({', '.join(model.meta.get('models', []))})"]
    if confusion_png:
        plot_confusion(Path(confusion_png), cm, L.class_names(old), f"{crops.name}, {len(rows)} photos\n{name[0]}", blocks=6)
    calibrated = ece(probs, y)  # the graph's output is already calibrated: before and after are the same
    return {"scores": scores(y, p), "per_class_f1": per_class_f1(y, p, L.NUM_CLASSES).tolist(), "confusion": cm.tolist(),
            "n": len(rows), "class_names": L.class_names(old), "models": name, "ece_before": calibrated,
            "ece_after": calibrated, "temperatures": model.meta.get("temperatures", [1.0])}
