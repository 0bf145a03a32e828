"""Prediction: checkpoint(s) + eval photos (or a crops folder) → submission CSV.

The checkpoint alone defines the model, the classes, the eval transform and the crop settings:
given raw photos, `predict` runs the crop stage itself with the settings the training crops were
made with (cached like `crop`). Several checkpoints are averaged by probability, each with its
own eval transform. Validation during training used the same dataset class, eval transform and
`engine.infer`, so the validation score is the score of this code path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from preprocess import labels as L
from preprocess.detector import FaceDetector
from preprocess.layouts import LayoutError
from preprocess.manifest import read_manifest, read_meta
from preprocess.runtime import check_device, resolve_device

from classify.checkpoint import load_checkpoint
from classify.data.dataset import CropDataset
from classify.inference.engine import DEFAULT_WORKERS, check_infer_options, infer, make_loader, resolve_amp
from classify.errors import CheckpointError, ConfigError
from classify.inference.answer import Answer, answer, check_vote
from classify.models.nets import create_model, upgrade_state
from classify.inference.cropping import crops_for
from classify.inference.card import card_of
from classify.inference.rundir import fold_dirs
from classify.inference.submission import Prediction, conclude  # noqa: F401 (Prediction: what predict returns)
from classify.data.transforms import build_transform


def load_model(ckpt: dict, device: torch.device) -> torch.nn.Module:
    try:
        spec = card_of(ckpt)
        model = create_model(spec.name, weights="none", **spec.kwargs)
        model.load_state_dict(upgrade_state(spec.name, ckpt["model_state"]))
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint does not match its model description "
                              f"({card_of(ckpt).name}): {e}") from None
    return model.to(device).eval()


def checkpoint_paths(paths: list[Path]) -> list[Path]:
    """Checkpoint files, with each run folder replaced by its best.pt, or a k-fold run folder by
    every fold's best.pt (fold0, fold1, ... in order)."""
    out = []
    for p in map(Path, paths):
        if not p.is_dir():
            out.append(p)
            continue
        folds = fold_dirs(p)
        found = [f / "best.pt" for f in folds if (f / "best.pt").is_file()] or (
            [p / "best.pt"] if (p / "best.pt").is_file() else [])
        if not found:
            raise CheckpointError(f"{p} is a folder without best.pt or fold*/best.pt: give a run folder or checkpoint files")
        if folds and len(found) < len(folds):
            missing = [f.name for f in folds if not (f / "best.pt").is_file()]
            raise CheckpointError(f"{p}: {', '.join(missing)} has no best.pt yet (an unfinished k-fold run); "
                                  "finish it with `maskcls train --resume`, or give the folds' checkpoints one by one")
        out += found
    return out


def model_logits(ckpts: list[dict], crops: Path, rows: list[dict], device: torch.device, tta: int = 1,
                 batch_size: int = 64, workers: int = 2) -> list[np.ndarray]:
    """Each checkpoint's logits for `rows` of `crops`, V views x N x 18, each model with its own eval
    transform and normalisation (`answer.answer` turns them into probabilities and classes)."""
    out = []
    pos = {r["index"]: k for k, r in enumerate(rows)}
    for ckpt in ckpts:
        spec = card_of(ckpt)
        tf = build_transform(spec.preset, spec.img_size, train=False, interpolation=spec.interpolation)
        ds = CropDataset(crops, rows, tf)
        model = load_model(ckpt, device)
        amp = resolve_amp(spec.amp, device)
        idx, logits = infer(model, make_loader(ds, batch_size, workers, device), device, tta=tta, amp=amp,
                            mean=list(spec.mean), std=list(spec.std))
        z = np.zeros((tta, len(rows), L.NUM_CLASSES))
        z[:, [pos[i] for i in idx]] = logits
        out.append(z)
    return out


def ensemble(ckpts: list[dict], crops: Path, rows: list[dict], device: torch.device, tta: int = 1, batch_size: int = 64,
             workers: int = 2, vote: str = "soft", calibrate: bool = True) -> Answer:
    """The checkpoints' answer for `rows` of `crops` (`answer.answer`: temperature, TTA mean, vote)."""
    return answer(model_logits(ckpts, crops, rows, device, tta, batch_size, workers),
                  [card_of(c).temperature for c in ckpts], calibrate, vote)


def check_ensemble(ckpts: list[dict]) -> None:
    """Checkpoints that cannot be combined are refused: different crops, or different age boundaries
    (their class 2 of age means different people, so their probabilities do not add up)."""
    specs = [card_of(c) for c in ckpts]
    keys = {s.crop.get("key") for s in specs}
    if len(keys) > 1:
        raise CheckpointError("these checkpoints were trained on crops made with different settings, so no one "
                              "crop of the photos suits them all: predict them separately and average the --probs")
    olds = sorted({s.old for s in specs})
    if len(olds) > 1:
        raise CheckpointError(f"these checkpoints were trained with different --old ({', '.join(map(str, olds))}): "
                              "their age groups mean different ages, so they cannot be combined; ensemble the "
                              "checkpoints of one --old")


def predict(checkpoints: list[Path], source: Path, out: Path | None = None, tta: int = 1, probs_out: Path | None = None,
            cache: Path | None = None, device: str = "auto", batch_size: int = 64, workers: int | None = None,
            detector: FaceDetector | None = None, on_progress=None, vote: str = "soft", calibrate: bool = True,
            review: Path | None = None, below: float = 0.5) -> Prediction:
    """Predict every photo of `source` (an eval folder with info.csv, or a crops folder) and write the
    submission `ImageID,ans` in info.csv's (or the manifest's) order. `checkpoints` may name run
    folders: a k-fold run folder stands for every fold's best.pt. Several models are combined by
    `vote` (soft: mean probability; hard: majority of their top classes).

    >>> predict([Path("run/best.pt")], Path("data_samples/eval"), Path("submission.csv"), tta=2)
    >>> predict([Path("runs/kfold")], Path("eval"), Path("submission.csv"), vote="hard")
    """
    if not checkpoints:
        raise CheckpointError("give at least one checkpoint")
    workers = DEFAULT_WORKERS if workers is None else workers
    check_infer_options(tta, batch_size, workers)
    check_device(device)
    if not 0 < below <= 1:
        raise ConfigError(f"--below {below}: must be in (0, 1] (a probability)")
    check_vote(vote)
    paths = checkpoint_paths(checkpoints)
    ckpts = [load_checkpoint(p) for p in paths]
    check_ensemble(ckpts)
    keys = {card_of(c).crop.get("key") for c in ckpts}
    dev = resolve_device(device)
    crops, warnings = crops_for(Path(source), card_of(ckpts[0]).crop, cache, device, detector, on_progress)
    given_key, trained_key = read_meta(crops).get("key"), keys.pop()
    if given_key and trained_key and given_key != trained_key:
        warnings.append(f"{crops} was cropped with other settings than the training crops (key {given_key} vs "
                        f"{trained_key}): predictions may be worse than validation said; pass the raw folder to "
                        "crop it the training way")
    rows = read_manifest(crops)
    for i, r in enumerate(rows):
        r["index"] = i
    if not rows:
        raise LayoutError(f"{source} holds no photo to predict")
    ans = ensemble(ckpts, crops, rows, dev, tta, batch_size, workers, vote, calibrate)
    return conclude(rows, ans.scores, ans.labels, crops, warnings, card_of(ckpts[0]).old, describe_models(paths, ckpts),
                    out, probs_out, review, below)




def describe_models(paths: list[Path], ckpts: list[dict]) -> list[str]:
    """Each checkpoint as "run/fold0/best.pt (resnet18)": what predict and evaluate say they used."""
    return [f"{Path(p).parent.name}/{Path(p).name} ({card_of(c).label})" for p, c in zip(paths, ckpts)]
