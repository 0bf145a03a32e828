"""Predict and evaluate with an exported model (`maskcls export`): onnxruntime, no torch.

The same steps as `predict.predict` with a checkpoint: raw photos are cropped with the model's crop
settings and face prior into the cache (`cropping.crops_for`), each crop goes through the same eval
transform, and the submission, probabilities and review list are written by the same functions.
TTA views are not part of the graph: an ONNX model predicts with one view (`--tta 1`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocess.layouts import LayoutError
from preprocess.manifest import read_manifest, read_meta

from .cropping import crops_for
from .errors import ConfigError
from .onnx_model import OnnxModel, batches
from .submission import Prediction, conclude


def onnx_probs(model: OnnxModel, crops: Path, rows: list[dict], batch_size: int = 64) -> np.ndarray:
    return np.concatenate([model.run(x) for _, x in batches(crops, rows, model, batch_size)]) if rows else np.zeros((0, 18))


def predict_onnx(path: Path, source: Path, out: Path | None = None, tta: int = 1, probs_out: Path | None = None,
                 cache: Path | None = None, device: str = "auto", batch_size: int = 64, detector=None, on_progress=None,
                 review: Path | None = None, below: float = 0.5) -> Prediction:
    """`predict.predict` for one exported model."""
    if tta != 1:
        raise ConfigError(f"--tta {tta}: an exported model predicts one view (its graph holds no TTA); use --tta 1 "
                          "or predict with the checkpoint")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be >= 1")
    if not 0 < below <= 1:
        raise ConfigError(f"--below {below}: must be in (0, 1] (a probability)")
    model = OnnxModel(path)
    crops, warnings = crops_for(Path(source), model.crop, cache, "cpu" if device == "auto" else device, detector,
                                on_progress)
    given, trained = read_meta(crops).get("key"), model.crop.get("key")
    if given and trained and given != trained:
        warnings.append(f"{crops} was cropped with other settings than the training crops: predictions may be worse "
                        "than validation said; pass the raw folder to crop it the training way")
    rows = read_manifest(crops)
    if not rows:
        raise LayoutError(f"{source} holds no photo to predict")
    probs = onnx_probs(model, crops, rows, batch_size)
    return conclude(rows, probs, probs.argmax(1), crops, warnings, model.old,
                    [f"{Path(path).name} ({', '.join(model.meta.get('models', []))})"], out, probs_out, review, below)
