"""Evaluation of checkpoint(s) on a labelled crops folder: accuracy and macro F1 of the 18 classes and
per task, per-class F1, the confusion matrix. It predicts with `predict.model_logits`, the same
path as `predict` and as validation during training, and `answer.answer` as every caller."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocess import labels as L

from classify.checkpoint import load_checkpoint
from classify.inference.card import card_of
from classify.data.dataset import load_rows
from classify.errors import ConfigError
from classify.metrics import confusion, per_class_f1, scores
from classify.inference.onnx_model import is_onnx
from classify.inference.engine import DEFAULT_WORKERS, check_infer_options
from classify.inference.answer import answer
from classify.inference.calibration import ece
from classify.inference.predict import check_ensemble, checkpoint_paths, describe_models, model_logits
from classify.plots import plot_confusion
from preprocess.runtime import check_device, resolve_device


def evaluate(checkpoints: list[Path], crops: Path, tta: int = 1, device: str = "auto", batch_size: int = 64,
             workers: int | None = None, confusion_png: Path | None = None, vote: str = "soft",
             calibrate: bool = True) -> dict:
    """{'scores': {...}, 'per_class_f1': [...], 'confusion': 18x18, 'n': photos} for the labelled
    photos of `crops` (the trainable statuses, `manifest.TRAINABLE`). Labels are taken at the
    checkpoints' `val_old` (60, the competition's boundary, unless training said otherwise), whatever
    `old` they were trained with: the score is the competition's."""
    if any(is_onnx(c) for c in checkpoints):
        check_infer_options(tta, batch_size, 0)
        return _evaluate_onnx(checkpoints, Path(crops), tta, batch_size, confusion_png, vote, calibrate, workers)
    workers = DEFAULT_WORKERS if workers is None else workers
    check_infer_options(tta, batch_size, workers)
    check_device(device)
    paths = checkpoint_paths(checkpoints)
    ckpts = [load_checkpoint(p) for p in paths]
    check_ensemble(ckpts)
    old = card_of(ckpts[0]).val_old
    _, rows = load_rows(Path(crops), old)
    if not rows:
        raise ConfigError(f"{crops} has no labelled photo to evaluate (an eval folder's labels are unknown)")
    logits = model_logits(ckpts, Path(crops), rows, resolve_device(device), tta, batch_size, workers)
    temps = [card_of(c).temperature for c in ckpts]
    p = answer(logits, temps, calibrate, vote).labels
    y = np.array([r["label"] for r in rows])
    before, after = answer(logits, temps, False).scores, answer(logits, temps, True).scores
    cm = confusion(y, p, L.NUM_CLASSES)
    models = describe_models(paths, ckpts)
    if confusion_png:
        plot_confusion(Path(confusion_png), cm, L.class_names(old),
                       f"{Path(crops).name}, {len(rows)} photos\n{', '.join(models)}; tta {tta}, vote {vote}", blocks=6)
    return {"scores": scores(y, p), "per_class_f1": per_class_f1(y, p, L.NUM_CLASSES).tolist(),
            "confusion": cm.tolist(), "n": len(rows), "class_names": L.class_names(old), "models": models,
            "ece_before": ece(before, y), "ece_after": ece(after, y),
            "temperatures": [card_of(c).temperature for c in ckpts]}


def _evaluate_onnx(models: list[Path], crops: Path, tta: int, batch_size: int, confusion_png: Path | None,
                   vote: str, calibrate: bool, workers: int | None) -> dict:
    """`evaluate` of one exported model: its logits through `answer.answer`, as a checkpoint's."""
    from classify.inference.onnx_predict import check_onnx_options, onnx_logits
    from classify.inference.onnx_model import OnnxModel, the_one_onnx

    check_onnx_options(tta, workers)
    model = OnnxModel(the_one_onnx(models))
    old = model.val_old
    _, rows = load_rows(crops, old)
    if not rows:
        raise ConfigError(f"{crops} has no labelled photo to evaluate (an eval folder's labels are unknown)")
    logits, temps = onnx_logits(model, crops, rows, batch_size), model.temperatures
    y, p = np.array([r["label"] for r in rows]), answer(logits, temps, calibrate, vote).labels
    cm = confusion(y, p, L.NUM_CLASSES)
    name = [f"{Path(models[0]).name} ({', '.join(model.models)})"]
    if confusion_png:
        plot_confusion(Path(confusion_png), cm, L.class_names(old), f"{crops.name}, {len(rows)} photos\n{name[0]}", blocks=6)
    return {"scores": scores(y, p), "per_class_f1": per_class_f1(y, p, L.NUM_CLASSES).tolist(), "confusion": cm.tolist(),
            "n": len(rows), "class_names": L.class_names(old), "models": name,
            "ece_before": ece(answer(logits, temps, False).scores, y), "ece_after": ece(answer(logits, temps).scores, y),
            "temperatures": temps}
