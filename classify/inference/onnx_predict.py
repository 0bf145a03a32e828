"""Predict and evaluate with an exported model (`maskcls export`): onnxruntime, no torch.

The same steps as `predict.predict` with a checkpoint: raw photos are cropped with the model's crop
settings and face prior into the cache (`cropping.crops_for`), each crop goes through the same eval
transform, and the submission, probabilities and review list are written by the same functions.
The graph returns each model's logits; `answer.answer` applies the temperatures (`calibrate`) and the
`vote`, as for checkpoints. TTA views are not part of the graph: an ONNX model predicts with one view
(`--tta 1`), and `--workers` (DataLoader processes) is for checkpoints: both are refused, not ignored.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocess.layouts import LayoutError
from preprocess.manifest import read_manifest, read_meta

from classify.inference.answer import answer, check_vote
from classify.inference.cropping import crops_for
from classify.errors import ConfigError
from classify.inference.onnx_model import OnnxModel, batches
from classify.inference.submission import Prediction, conclude


def onnx_logits(model: OnnxModel, crops: Path, rows: list[dict], batch_size: int = 64) -> list[np.ndarray]:
    """Each model's logits (1 x N x 18) for `rows` of `crops`."""
    runs = [model.run(x) for _, x in batches(crops, rows, model, batch_size)]
    if not runs:
        return [np.zeros((1, 0, 18)) for _ in model.temperatures]
    return [np.concatenate([r[m] for r in runs], axis=1) for m in range(len(runs[0]))]


def check_onnx_options(tta: int = 1, workers: int | None = None) -> None:
    """What an exported model cannot honour is refused, never ignored."""
    if tta != 1:
        raise ConfigError(f"--tta {tta}: an exported model predicts one view (its graph holds no TTA); use --tta 1 "
                          "or predict with the checkpoint")
    if workers is not None:
        raise ConfigError(f"--workers {workers}: an exported model runs in onnxruntime's threads, without DataLoader "
                          "workers; leave --workers out, or predict with the checkpoint")


def predict_onnx(path: Path, source: Path, out: Path | None = None, tta: int = 1, probs_out: Path | None = None,
                 cache: Path | None = None, device: str = "auto", batch_size: int = 64, detector=None, on_progress=None,
                 review: Path | None = None, below: float = 0.5, vote: str = "soft", calibrate: bool = True,
                 workers: int | None = None) -> Prediction:
    """`predict.predict` for one exported model."""
    check_onnx_options(tta, workers)
    check_vote(vote)
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
    ans = answer(onnx_logits(model, crops, rows, batch_size), model.temperatures, calibrate, vote)
    return conclude(rows, ans.scores, ans.labels, crops, warnings, model.old,
                    [f"{Path(path).name} ({', '.join(model.models)})"], out, probs_out, review, below)
