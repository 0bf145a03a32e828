"""The torch backend's parts (backends.TorchBackend): checkpoints, run folders and k-fold runs found,
loaded and run on crops, each model with its own eval transform and normalisation, returning logits
(`model_logits`). Validation during training runs the same dataset class, eval transform and
`engine.infer`, so the validation score is the score of this path. `predict` is predictor.py's, the one
path for both backends.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from preprocess import labels as L

from classify.data.dataset import CropDataset
from classify.data.transforms import build_transform
from classify.errors import CheckpointError
from classify.inference.card import card_of
from classify.inference.engine import infer, make_loader, resolve_amp
from classify.inference.rundir import fold_dirs, recover_swap
from classify.models.nets import create_model, upgrade_state


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
        if not p.exists():
            recover_swap(p)  # a `train --overwrite` killed between its renames: finished (or undone) first
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


def describe_models(paths: list[Path], ckpts: list[dict]) -> list[str]:
    """Each checkpoint as "run/fold0/best.pt (resnet18)": what predict and evaluate say they used."""
    return [f"{Path(p).parent.name}/{Path(p).name} ({card_of(c).label})" for p, c in zip(paths, ckpts)]
