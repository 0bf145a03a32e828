"""What prediction returns and writes: the `Prediction`, the submission (`ImageID,ans`), the 18
probabilities, and the review list of unsure photos. Numpy only (no torch), for every model kind.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocess import labels as L
from classify.inference.answer import class_probability
from classify.inference.rundir import write_csv


@dataclass
class Prediction:
    image_ids: list[str]
    probs: np.ndarray          # N x 18: the models' mean (calibrated) probabilities, whatever the vote
    rows: list[dict]           # the manifest rows predicted, same order
    crops: Path
    warnings: list[str]
    labels: np.ndarray         # N predicted classes (the vote's)
    old: int = L.DEFAULT_OLD   # the checkpoints' training age boundary (one for all: check_ensemble)
    models: list[str] = None   # each checkpoint, as "path (model)"
    votes: np.ndarray | None = None  # --vote hard: N x 18, the share of models voting each class
    classes: list[str] = None  # the 18 class names, from the model's card
    unlearned: tuple[str, ...] = ()  # the tasks a model of the ensemble has not learned (its card's caution)

    def __post_init__(self):
        if self.classes is None:
            self.classes = L.class_names(self.old)

    @property
    def confidence(self) -> np.ndarray:
        """N: the mean probability of each photo's predicted class (under a hard vote too: never a share)."""
        return class_probability(self.probs, self.labels)


def conclude(rows: list[dict], probs: np.ndarray, labels: np.ndarray, crops: Path, warnings: list[str], old: int,
             models: list[str], out: Path | None, probs_out: Path | None, review: Path | None,
             below: float, votes: np.ndarray | None = None, classes: list[str] | None = None) -> Prediction:
    """The Prediction of a model (or ensemble) over `rows`, with a warning per photo that had no pixels,
    and the files asked for: the submission, the probabilities, the review list."""
    from preprocess.manifest import NO_FACE_FOUND, NO_PIXELS

    warnings += [f"{r['image_id']}: {r['reason']}; predicted from a blank stand-in crop"
                 for r in rows if r["status"] in NO_PIXELS]
    guessed = [r for r in rows if r["status"] in NO_FACE_FOUND]
    if guessed:  # their answers read a crop where a face should be, not a face the detector found
        shown = ", ".join(f"{r['image_id']} ({r['status']})" for r in guessed[:3])
        warnings.append(f"{len(guessed)} of {len(rows)} photos: no face found, so each answer reads the crop where "
                        f"a face should be (prior_box: where faces sit in the training photos; person_box: where the "
                        f"person's other photos show it), not a face: {shown}{', ...' if len(guessed) > 3 else ''} "
                        f"(every photo's status: {Path(crops) / 'manifest.csv'})")
    pred = Prediction([r["image_id"] for r in rows], probs, rows, crops, warnings, labels, old, models, votes, classes)
    if out is not None:
        write_submission(Path(out), pred)
    if probs_out is not None:
        write_probs(Path(probs_out), pred)
    if review is not None:
        write_review(Path(review), pred, below)
    return pred


def write_submission(path: Path, pred: Prediction) -> None:
    write_csv(path, ["ImageID", "ans"], ([iid, int(y)] for iid, y in zip(pred.image_ids, pred.labels)))


def write_review(path: Path, pred: Prediction, below: float) -> int:
    """The photos whose predicted class has a (calibrated, mean) probability below `below`, least sure
    first, with their top three classes: the list a person looks at. Returns how many."""
    names = pred.classes
    top = np.argsort(-pred.probs, axis=1)[:, :3]
    sure = pred.confidence
    picked = [i for i in np.argsort(sure, kind="stable") if sure[i] < below]
    write_csv(path, ["ImageID", "status", "p_top", *[f"{k}{n}" for n in (1, 2, 3) for k in ("class", "name", "p")]],
              ([pred.image_ids[i], pred.rows[i]["status"], f"{sure[i]:.4f}",
                *[v for c in top[i] for v in (int(c), names[c], f"{pred.probs[i, c]:.4f}")]] for i in picked))
    return len(picked)


def write_probs(path: Path, pred: Prediction) -> None:
    write_csv(path, ["ImageID"] + [f"p{k}" for k in range(L.NUM_CLASSES)],
              ([iid] + [f"{v:.8f}" for v in p] for iid, p in zip(pred.image_ids, pred.probs)))
