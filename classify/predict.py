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

from .checkpoint import load_checkpoint
from .data import CropDataset
from .engine import check_infer_options, infer, make_loader, resolve_amp
from .errors import CheckpointError, ConfigError
from .calibration import apply_temperature
from .models import create_model, upgrade_state
from .cropping import crops_for
from .rundir import ModelSpec, fold_dirs
from .submission import Prediction, conclude  # noqa: F401 (Prediction: what predict returns)
from .transforms import build_transform


def load_model(ckpt: dict, device: torch.device) -> torch.nn.Module:
    try:
        spec = ModelSpec.of(ckpt)
        model = create_model(spec.name, weights="none", **spec.kwargs)
        model.load_state_dict(upgrade_state(spec.name, ckpt["model_state"]))
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint does not match its model description "
                              f"({(ckpt.get('model') or {}).get('name')}): {e}") from None
    return model.to(device).eval()


VOTES = ("soft", "hard")


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


def model_probs(ckpts: list[dict], crops: Path, rows: list[dict], device: torch.device, tta: int = 1,
                batch_size: int = 64, workers: int = 2, calibrate: bool = True) -> np.ndarray:
    """Each checkpoint's (TTA-averaged) probabilities for `rows` of `crops`: M x N x 18, each model with
    its own eval transform and normalisation, and (`calibrate`) its temperature (calibration.py)."""
    out = np.zeros((len(ckpts), len(rows), L.NUM_CLASSES))
    pos = {r["index"]: k for k, r in enumerate(rows)}
    for m, ckpt in enumerate(ckpts):
        spec = ModelSpec.of(ckpt)
        tf = build_transform(spec.preset, spec.img_size, train=False, interpolation=spec.interpolation)
        ds = CropDataset(crops, rows, tf)
        model = load_model(ckpt, device)
        amp = resolve_amp(spec.amp, device)
        idx, probs = infer(model, make_loader(ds, batch_size, workers, device), device, tta=tta, amp=amp,
                           mean=list(spec.mean), std=list(spec.std))
        out[m, [pos[i] for i in idx]] = apply_temperature(probs, spec.temperature) if calibrate else probs
    return out


def combine(probs: np.ndarray, vote: str = "soft") -> tuple[np.ndarray, np.ndarray]:
    """M x N x 18 → (scores N x 18, labels N). soft: the mean probability and its top class. hard:
    the share of models voting for each class, and the majority; a tie goes to the tied class with
    the highest mean probability."""
    if vote not in VOTES:
        raise ConfigError(f"--vote {vote!r}: choose soft or hard")
    mean = probs.mean(0)
    if vote == "soft":
        return mean, mean.argmax(1)
    votes = np.zeros_like(mean)
    for top in probs.argmax(2):
        votes[np.arange(len(top)), top] += 1
    tied = votes == votes.max(1, keepdims=True)
    labels = np.where(tied, mean, -1.0).argmax(1)
    return votes / len(probs), labels


def ensemble_probs(ckpts: list[dict], crops: Path, rows: list[dict], device: torch.device, tta: int = 1,
                   batch_size: int = 64, workers: int = 2, vote: str = "soft",
                   calibrate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The ensemble's (scores N x 18, labels N) for `rows` of `crops` (see `combine`)."""
    return combine(model_probs(ckpts, crops, rows, device, tta, batch_size, workers, calibrate), vote)


def check_ensemble(ckpts: list[dict]) -> None:
    """Checkpoints that cannot be combined are refused: different crops, or different age boundaries
    (their class 2 of age means different people, so their probabilities do not add up)."""
    specs = [ModelSpec.of(c) for c in ckpts]
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
            cache: Path | None = None, device: str = "auto", batch_size: int = 64, workers: int = 2,
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
    check_infer_options(tta, batch_size, workers)
    check_device(device)
    if not 0 < below <= 1:
        raise ConfigError(f"--below {below}: must be in (0, 1] (a probability)")
    if vote not in VOTES:
        raise ConfigError(f"--vote {vote!r}: choose soft or hard")
    paths = checkpoint_paths(checkpoints)
    ckpts = [load_checkpoint(p) for p in paths]
    check_ensemble(ckpts)
    keys = {ModelSpec.of(c).crop.get("key") for c in ckpts}
    dev = resolve_device(device)
    crops, warnings = crops_for(Path(source), ModelSpec.of(ckpts[0]).crop, cache, device, detector, on_progress)
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
    probs, labels = ensemble_probs(ckpts, crops, rows, dev, tta, batch_size, workers, vote, calibrate)
    return conclude(rows, probs, labels, crops, warnings, ModelSpec.of(ckpts[0]).old, describe_models(paths, ckpts),
                    out, probs_out, review, below)




def describe_models(paths: list[Path], ckpts: list[dict]) -> list[str]:
    """Each checkpoint as "run/fold0/best.pt (resnet18)": what predict and evaluate say they used."""
    return [f"{Path(p).parent.name}/{Path(p).name} ({ModelSpec.of(c).label})" for p, c in zip(paths, ckpts)]
