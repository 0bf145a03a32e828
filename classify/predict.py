"""Prediction: checkpoint(s) + eval photos (or a crops folder) → submission CSV.

The checkpoint alone defines the model, the classes, the eval transform and the crop settings:
given raw photos, `predict` runs the crop stage itself with the settings the training crops were
made with (cached like `crop`). Several checkpoints are averaged by probability, each with its
own eval transform. Validation during training used the same dataset class, eval transform and
`engine.infer`, so the validation score is the score of this code path.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from preprocess import labels as L
from preprocess.crop import CropConfig, crop_dataset
from preprocess.detector import FaceDetector, MTCNNDetector
from preprocess.imageio import atomic_write_bytes
from preprocess.layouts import LayoutError
from preprocess.manifest import read_manifest, read_meta
from preprocess.runtime import resolve_device

from .checkpoint import load_checkpoint
from .data import CropDataset
from .engine import infer, make_loader
from .errors import CheckpointError
from .models import create_model
from .transforms import build_transform


@dataclass
class Prediction:
    image_ids: list[str]
    probs: np.ndarray          # N x 18
    rows: list[dict]           # the manifest rows predicted, same order
    crops: Path
    warnings: list[str]

    @property
    def labels(self) -> np.ndarray:
        return self.probs.argmax(1)


def load_model(ckpt: dict, device: torch.device) -> torch.nn.Module:
    m = ckpt["model"]
    try:
        model = create_model(m["name"], weights="none", **m.get("kwargs", {}))
        model.load_state_dict(ckpt["model_state"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint does not match its model description ({m.get('name')}): {e}") from None
    return model.to(device).eval()


def ensemble_probs(ckpts: list[dict], crops: Path, rows: list[dict], device: torch.device, tta: int = 1,
                   batch_size: int = 64, workers: int = 2) -> np.ndarray:
    """Mean over checkpoints of their (TTA-averaged) probabilities for `rows` of `crops`, N x 18."""
    total = np.zeros((len(rows), L.NUM_CLASSES))
    for ckpt in ckpts:
        tf = build_transform(ckpt["preset"], ckpt["img_size"], train=False)
        ds = CropDataset(crops, rows, tf)
        model = load_model(ckpt, device)
        amp = bool(ckpt["config"].get("amp")) and device.type == "cuda"
        idx, probs = infer(model, make_loader(ds, batch_size, workers, device), device, tta=tta, amp=amp,
                           mean=ckpt["mean"], std=ckpt["std"])
        pos = {r["index"]: k for k, r in enumerate(rows)}
        total[[pos[i] for i in idx]] += probs
    return total / len(ckpts)


def crops_for(source: Path, ckpt: dict, cache: Path | None, device: str, detector: FaceDetector | None = None,
              on_progress: Callable[[int, int], None] | None = None) -> tuple[Path, list[str]]:
    """The crops folder to predict from: `source` itself if it has a manifest, else `source` cropped
    with the checkpoint's crop settings into the cache (reused when nothing changed)."""
    source = Path(source)
    if (source / "manifest.csv").is_file():
        return source, []
    crop_meta = ckpt.get("crop") or {}
    if not crop_meta.get("config"):
        raise CheckpointError("the checkpoint records no crop settings, so raw photos cannot be cropped the way "
                              "training saw them; run `maskcls crop` yourself and pass the crops folder")
    known = {f.name for f in fields(CropConfig)}
    cfg = CropConfig(**{k: v for k, v in crop_meta["config"].items() if k in known} | {"device": device, "strict": False})
    det = crop_meta.get("detector", {})
    if detector is None:
        if det.get("detector") != "mtcnn":
            raise CheckpointError(f"the training crops were made with detector {det.get('detector')!r}, which "
                                  "predict cannot rebuild; crop the photos yourself and pass the crops folder")
        detector = MTCNNDetector(device=device, detect_side=det["detect_side"], min_face=det["min_face"],
                                 thresholds=tuple(det["thresholds"]), relaxed_thresholds=tuple(det["relaxed_thresholds"]),
                                 factor=det["factor"], batch_size=cfg.batch_size)
    if cache is None:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "maskcls" / "crops"
        cache = base / hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    res = crop_dataset(source, cache, cfg, detector=detector, on_progress=on_progress)
    return cache, res.warnings


def predict(checkpoints: list[Path], source: Path, out: Path | None = None, tta: int = 1, probs_out: Path | None = None,
            cache: Path | None = None, device: str = "auto", batch_size: int = 64, workers: int = 2,
            detector: FaceDetector | None = None, on_progress=None) -> Prediction:
    """Predict every photo of `source` (an eval folder with info.csv, or a crops folder) and write the
    submission `ImageID,ans` in info.csv's (or the manifest's) order.

    >>> predict([Path("run/best.pt")], Path("data_samples/eval"), Path("submission.csv"), tta=2)
    """
    if not checkpoints:
        raise CheckpointError("give at least one checkpoint")
    ckpts = [load_checkpoint(p) for p in checkpoints]
    keys = {(c.get("crop") or {}).get("key") for c in ckpts}
    if len(keys) > 1:
        raise CheckpointError("these checkpoints were trained on crops made with different settings, so no one "
                              "crop of the photos suits them all: predict them separately and average the --probs")
    dev = resolve_device(device)
    crops, warnings = crops_for(Path(source), ckpts[0], cache, device, detector, on_progress)
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
    probs = ensemble_probs(ckpts, crops, rows, dev, tta, batch_size, workers)
    for r in rows:
        if r["status"] in ("unreadable", "missing"):
            warnings.append(f"{r['image_id']}: {r['reason']}; predicted from a blank stand-in crop")
    pred = Prediction([r["image_id"] for r in rows], probs, rows, crops, warnings)
    if out is not None:
        write_submission(Path(out), pred)
    if probs_out is not None:
        write_probs(Path(probs_out), pred)
    return pred


def write_submission(path: Path, pred: Prediction) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["ImageID", "ans"])
    for iid, y in zip(pred.image_ids, pred.labels):
        w.writerow([iid, int(y)])
    atomic_write_bytes(path, buf.getvalue().encode())


def write_probs(path: Path, pred: Prediction) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["ImageID"] + [f"p{k}" for k in range(L.NUM_CLASSES)])
    for iid, p in zip(pred.image_ids, pred.probs):
        w.writerow([iid] + [f"{v:.8f}" for v in p])
    atomic_write_bytes(path, buf.getvalue().encode())
