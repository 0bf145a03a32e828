"""Accuracy and macro F1, for the 18 classes and per task (decoded from the 18-class prediction).

Macro F1 averages over the classes present in the targets or the predictions, as scikit-learn's
f1_score(average='macro') does, which is what the competition scored.
"""
from __future__ import annotations

import math

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


def unlearned_tasks(y, p, units=None, margin_se: float = 0.0) -> dict[str, tuple[float, float]]:
    """{task: (accuracy, baseline)} of the tasks the predictions `p` have not learned: accuracy no better than
    always answering the task's most common label among `y` (18-class labels). A task whose labels hold one
    value is left out (nothing to learn). `units`: a key per photo (a person) to judge per unit instead, each
    unit's answer its photos' most common predicted value against its most common label (gender and age are
    a person's: judged per photo, a person with many photos counts many times).

    `margin_se`: ask for more than the baseline, by that many standard errors of a binomial share at the
    baseline's rate over the units judged (`learned_margin`): a model that has learned nothing lands within
    about 2 of them of the baseline by chance, so 2 asks for an accuracy chance does not explain."""
    y, p = np.asarray(y, int), np.asarray(p, int)
    out = {}
    for task, yt, pt in zip(L.TASKS, L.task_parts(y), L.task_parts(p)):
        if units is not None and task != "mask":
            yt, pt = _per_unit(yt, units), _per_unit(pt, units)
        counts = np.bincount(yt, minlength=len(L.TASKS[task]))
        if len(yt) == 0 or (counts > 0).sum() < 2:
            continue
        acc, base = float((yt == pt).mean()), float(counts.max() / len(yt))
        if acc <= base + learned_margin(base, len(yt), margin_se):
            out[task] = (acc, base)
    return out


def learned_margin(base: float, n: int, margin_se: float) -> float:
    """`margin_se` standard errors of a binomial share at rate `base` over `n` units."""
    return margin_se * math.sqrt(base * (1 - base) / n) if n else 0.0


def _per_unit(values: np.ndarray, units) -> np.ndarray:
    groups: dict = {}
    for v, u in zip(values, units):
        groups.setdefault(u, []).append(int(v))
    return np.array([np.bincount(g).argmax() for g in groups.values()], dtype=int)


def not_learned_caution(unlearned: dict[str, tuple[float, float]], where: str = "validation") -> str | None:
    """The one caution for a model that has not learned a task, wherever its numbers are shown."""
    if not unlearned:
        return None
    parts = "; ".join(f"{t} accuracy {a:.3f} vs {b:.3f}" for t, (a, b) in unlearned.items())
    return (f"the model has not learned {', '.join(unlearned)}: on {where} it is no better than always answering "
            f"the most common label ({parts}); its {'/'.join(unlearned)} answers and probabilities say nothing yet "
            "(train longer, from pretrained weights, or on more people)")


def unlearned_labels(folder, tasks) -> str:
    """What pseudo-labels from a model that has not learned `tasks` are: said where they are made and used."""
    return (f"{folder}: its {'/'.join(tasks)} labels are the guesses of a model that has not learned "
            f"{', '.join(tasks)} (its caution), not what it knows; `train --extra` would teach those guesses. "
            "Pseudo-label with a model that has learned them")
