"""Accuracy and macro F1, for the 18 classes and per task (decoded from the 18-class prediction).

Macro F1 averages over the classes present in the targets or the predictions, as scikit-learn's
f1_score(average='macro') does, which is what the competition scored.
"""
from __future__ import annotations

import numpy as np

from preprocess import labels as L

FEW_VAL_PEOPLE = 20  # scores (or a temperature) from fewer validation people than this carry a caution


def few_people(people: int, what: str = "validation") -> str | None:
    """The caution for a score or fit made on `people` validation people, or None when they are enough.
    One wording for train, compare, tune and calibration."""
    if people >= FEW_VAL_PEOPLE:
        return None
    return (f"{what} holds {people} people: a score from so few says little about new people (one newcomer's "
            "4-person validation said F1 0.271 where held-out people scored 0.019); use more people, a larger "
            "--val-ratio, or --folds K --fold all (every person validates once)")


def confusion(y: np.ndarray, p: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(n * np.asarray(y, int) + np.asarray(p, int), minlength=n * n).reshape(n, n)


def macro_f1(y, p, n: int) -> float:
    cm = confusion(y, p, n)
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[present].mean()) if present.any() else 0.0


def per_class_f1(y, p, n: int) -> np.ndarray:
    cm = confusion(y, p, n)
    denom = cm.sum(1) + cm.sum(0)
    return np.divide(2 * np.diag(cm), denom, out=np.zeros(n), where=denom > 0)


def scores(y, p) -> dict[str, float]:
    """{'acc', 'f1', 'mask_acc', 'mask_f1', 'gender_acc', ..., 'age_f1'} of 18-class labels y and predictions p."""
    y, p = np.asarray(y, int), np.asarray(p, int)
    out = {"acc": float((y == p).mean()) if len(y) else 0.0, "f1": macro_f1(y, p, L.NUM_CLASSES)}
    for task, yt, pt in zip(L.TASKS, L.task_parts(y), L.task_parts(p)):
        n = len(L.TASKS[task])
        out[f"{task}_acc"] = float((yt == pt).mean()) if len(y) else 0.0
        out[f"{task}_f1"] = macro_f1(yt, pt, n)
    return out
