"""Pseudo-labels: the eval photos a model (or an ensemble) is confident about, as a crops folder that
`train --extra` adds to training only.

    maskcls pseudo-label RUN EVAL --out PSEUDO --min-prob 0.9
    maskcls train CROPS --out RUN2 --extra PSEUDO

The folder follows the manifest contract: its crops are the eval photos' crops (cropped as predict
crops them), each row carries the predicted label, its probability in `prob` and `reason`, and its
own person id (`pseudo:<image id>`), so no two photos are taken for one person. A pseudo-label knows
an age group, not an age: `age` is the group's representative (20, 45, old + 5 at the checkpoints'
`old`), and `train --extra` refuses a folder labelled at another `old`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from preprocess import labels as L
from preprocess.manifest import TRAINABLE, read_meta, write_manifest

from classify.errors import ConfigError
from classify.metrics import unlearned_labels
from classify.inference.predictor import predict


@dataclass
class PseudoResult:
    out: Path
    kept: int                 # photos written (probability >= min_prob)
    total: int                # photos predicted
    by_class: dict[int, int]  # kept photos per predicted class
    warnings: list[str]
    classes: list[str]        # the model's 18 class names (its card's: at its own `old`)


def representative_age(group: int, old: int) -> int:
    """An age inside `group` at the boundary `old` (what a pseudo-label row's `age` holds)."""
    return (20, (L.YOUNG + old) // 2, old + 5)[group]


def pseudo_label(checkpoints: list[Path], source: Path, out: Path, min_prob: float = 0.9, tta: int = 1,
                 cache: Path | None = None, device: str = "auto", batch_size: int = 64, workers: int | None = None,
                 vote: str = "soft", detector=None, on_progress=None, calibrate: bool = True) -> PseudoResult:
    """Predict `source` (an eval folder or a crops folder) and write the photos whose top probability is
    at least `min_prob` into `out` as a crops folder with their predicted labels."""
    if not 0 < min_prob <= 1:
        raise ConfigError(f"--min-prob {min_prob}: must be in (0, 1]")
    out = Path(out)
    if (out / "manifest.csv").exists():
        raise ConfigError(f"{out} already holds a crops folder; give a new --out")
    pred = predict(checkpoints, source, None, tta, cache=cache, device=device, batch_size=batch_size, workers=workers,
                   detector=detector, on_progress=on_progress, vote=vote, calibrate=calibrate)
    old = pred.old
    top = pred.confidence  # the voted class's mean probability: a vote share is no probability
    rows, by_class = [], {}
    for r, p, y in zip(pred.rows, top, pred.labels):
        if r["status"] not in TRAINABLE or p < min_prob:
            continue
        mask, gender, group = L.decode(int(y))
        dst = out / r["crop"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pred.crops / r["crop"], dst)
        rows.append(r | {"person_id": f"pseudo:{r['image_id']}", "gender": gender, "race": "", "mask": mask,
                         "age": representative_age(group, old), "age_group": group, "label": int(y),
                         "prob": float(p), "reason": f"pseudo-label p={p:.4f} ({len(pred.models)} model(s), {vote} vote)"})
        by_class[int(y)] = by_class.get(int(y), 0) + 1
    meta = read_meta(pred.crops) | {
        "layout": "pseudo", "rows": len(rows),
        "pseudo": {"models": pred.models, "source": str(source), "min_prob": min_prob,
                   "tta": tta, "vote": vote, "old": old, "kept": len(rows), "predicted": len(pred.rows),
                   "unlearned": list(pred.unlearned)}}
    meta.pop("counts", None)
    write_manifest(out, rows, meta)
    warnings = list(pred.warnings)
    if pred.unlearned and rows:
        warnings.append(unlearned_labels(out, pred.unlearned))
    return PseudoResult(out, len(rows), len(pred.rows), dict(sorted(by_class.items())), warnings, pred.classes)
