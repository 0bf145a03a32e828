"""Evaluation of a model (checkpoints, run folders, or one exported .onnx) on a labelled crops folder:
accuracy and macro F1 of the 18 classes and per task, per-class F1, the confusion matrix, the ECE before
and after calibration. Its logits come from the backend predict uses (backends.py) and its answer from
`answer.answer`, as every caller's."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocess import labels as L
from preprocess.runtime import check_device

from classify.errors import ConfigError
from classify.inference.answer import answer, check_vote
from classify.inference.backends import open_backend
from classify.inference.calibration import ece
from classify.inference.predictor import check_infer_options, other_cropping
from classify.metrics import confusion, not_learned_caution, per_class_f1, scores, unlearned_tasks
from classify.plots import plot_confusion


def evaluate(models: list[Path], crops: Path, tta: int = 1, device: str = "auto", batch_size: int = 64,
             workers: int | None = None, confusion_png: Path | None = None, vote: str = "soft",
             calibrate: bool = True) -> dict:
    """{'scores': {...}, 'per_class_f1': [...], 'confusion': 18x18, 'n': photos} for the labelled
    photos of `crops` (the trainable statuses, `manifest.TRAINABLE`). Labels are taken at the models'
    `val_old` (60, the competition's boundary, unless training said otherwise), whatever `old` they were
    trained with: the score is the competition's."""
    from classify.data.dataset import load_rows, person_key

    check_infer_options(tta, batch_size, workers)
    check_device(device)
    check_vote(vote)
    backend = open_backend(models, device, workers, tta)
    old = backend.card.val_old
    _, rows = load_rows(Path(crops), old)
    if not rows:
        raise ConfigError(f"{crops} has no labelled photo to evaluate (an eval folder's labels are unknown)")
    logits, temps = backend.logits(Path(crops), rows, tta, batch_size), backend.temperatures
    p = answer(logits, temps, calibrate, vote).labels
    y = np.array([r["label"] for r in rows])
    before, after = answer(logits, temps, False).scores, answer(logits, temps, True).scores
    cm = confusion(y, p, L.NUM_CLASSES)
    if confusion_png:
        plot_confusion(Path(confusion_png), cm, L.class_names(old),
                       f"{Path(crops).name}, {len(rows)} photos\n{', '.join(backend.names)}; tta {tta}, vote {vote}",
                       blocks=6)
    made = backend.card.crop.get("config") or {}
    warnings = other_cropping(Path(crops), backend.card.crop, "these scores",
                              f"crop its raw photos again as the training crops were (`maskcls crop RAW --out CROPS "
                              f"--size {made.get('size')} --margin {made.get('margin')} --detect-side "
                              f"{made.get('detect_side')} --min-face {made.get('min_face')}`)")
    seen = backend.trained_people()
    if seen:
        trained = [r for r in rows if person_key(r) in seen]
        if trained:
            warnings.append(f"{len(trained)} of {len(rows)} photos ({len({person_key(r) for r in trained})} people) show "
                            "people the model trained on (its split.csv): this score measures memory, not new people; "
                            "evaluate on people it never saw (a single run's validation people are in split.csv; a "
                            "k-fold run's honest score is its out-of-fold one, in summary.json)")
    # The table's accuracies read as skill; one no better than always answering the most common label is none
    # (mask judged per photo, gender and age per person, as training judges its validation).
    unlearned = unlearned_tasks(y, p, [person_key(r) for r in rows])
    if unlearned:
        warnings.append(not_learned_caution(unlearned, f"these {len(rows)} photos"))
    return {"warnings": warnings, "not_learned": {t: list(ab) for t, ab in unlearned.items()}, "scores": scores(y, p),
            "per_class_f1": per_class_f1(y, p, L.NUM_CLASSES).tolist(),
            "confusion": cm.tolist(), "n": len(rows), "class_names": L.class_names(old), "models": backend.names,
            "ece_before": ece(before, y), "ece_after": ece(after, y), "temperatures": temps}
