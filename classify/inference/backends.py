"""One interface, two backends: a trained model that turns a crops folder's rows into logits.

- `TorchBackend`: checkpoints (run folders, k-fold runs), in torch, with TTA views and DataLoader workers.
- `OnnxBackend`: one exported graph (`maskcls export`), in onnxruntime, without torch (one view; it has
  no DataLoader, so `--workers` is refused rather than ignored).

Both describe their models by their cards (card.py) and return each model's logits, V views x N x 18;
what becomes of them is `answer.answer`, for both. `open_backend` is the one place that tells them apart
by the file. This module imports no torch: the torch backend loads `predict` (and torch) when it is built.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from classify.errors import CheckpointError, ConfigError
from classify.inference.card import ModelCard
from classify.inference.onnx_model import OnnxModel, batches, is_onnx, the_one_onnx

DEFAULT_WORKERS = 2  # DataLoader workers when --workers is not given (checkpoints)


class Backend:
    """What predict, evaluate, pseudo-label and serve need of a model, whichever runs it."""
    cards: list[ModelCard]
    names: list[str]          # each model as predict's summary names it

    @property
    def temperatures(self) -> list[float]:
        return [c.temperature for c in self.cards]

    @property
    def card(self) -> ModelCard:
        """The first model's card: crop settings, `old` and `val_old` are one for the whole ensemble."""
        return self.cards[0]

    def logits(self, crops: Path, rows: list[dict], tta: int = 1, batch_size: int = 64) -> list[np.ndarray]:
        raise NotImplementedError

    def crop_device(self, device: str) -> str:
        """The device the detector runs on for raw photos: `auto` resolves in torch (cuda when there is one)."""
        return device

    def check_options(self, tta: int = 1) -> None:
        """Refuse options this backend cannot honour (open_backend does it when it opens one)."""

    def trained_people(self) -> set[str] | None:
        """The people (split.csv's person keys) any of the models trained on, or None where that is not
        recorded (an exported model carries no split)."""
        return None


class TorchBackend(Backend):
    def __init__(self, models: list[Path], device: str = "auto", workers: int | None = None):
        from classify.checkpoint import load_checkpoint
        from classify.inference.card import card_of
        from classify.inference.torch_backend import check_ensemble, checkpoint_paths, describe_models
        from preprocess.runtime import resolve_device

        self.paths = checkpoint_paths(models)
        self.ckpts = [load_checkpoint(p) for p in self.paths]
        check_ensemble(self.ckpts)
        self.cards = [card_of(c) for c in self.ckpts]
        self.names = describe_models(self.paths, self.ckpts)
        self.device = resolve_device(device)
        self.workers = DEFAULT_WORKERS if workers is None else workers

    def trained_people(self) -> set[str] | None:
        from classify.inference.rundir import SPLIT, read_split

        seen = set()
        for p in self.paths:
            if not (p.parent / SPLIT).is_file():
                return None
            seen |= {k for k, v in read_split(p.parent).items() if v in ("train", "extra")}
        return seen

    def logits(self, crops: Path, rows: list[dict], tta: int = 1, batch_size: int = 64) -> list[np.ndarray]:
        from classify.inference.torch_backend import model_logits

        return model_logits(self.ckpts, Path(crops), rows, self.device, tta, batch_size, self.workers)


class OnnxBackend(Backend):
    def __init__(self, path: Path, workers: int | None = None):
        if workers is not None:
            raise ConfigError(f"--workers {workers}: an exported model runs in onnxruntime's threads, without "
                              "DataLoader workers; leave --workers out, or predict with the checkpoint")
        self.model = OnnxModel(path)
        self.cards = self.model.cards
        self.names = [f"{Path(path).name} ({', '.join(self.model.models)})"]

    @property
    def temperatures(self) -> list[float]:
        return self.model.temperatures

    def crop_device(self, device: str) -> str:
        return "cpu" if device == "auto" else device  # resolving `auto` would import torch

    def check_options(self, tta: int = 1) -> None:
        _one_view(tta)

    def logits(self, crops: Path, rows: list[dict], tta: int = 1, batch_size: int = 64) -> list[np.ndarray]:
        _one_view(tta)
        runs = [self.model.run(x) for _, x in batches(crops, rows, self.model, batch_size)]
        if not runs:
            return [np.zeros((1, 0, 18)) for _ in self.temperatures]
        return [np.concatenate([r[m] for r in runs], axis=1) for m in range(len(runs[0]))]


def open_backend(models: list[Path], device: str = "auto", workers: int | None = None, tta: int = 1) -> Backend:
    """The backend for `models`: one exported .onnx, or checkpoints and run folders. Options the backend
    cannot honour are refused here, before any work."""
    if not models:
        raise CheckpointError("give at least one checkpoint")
    if any(is_onnx(m) for m in models):
        _one_view(tta)
        return OnnxBackend(the_one_onnx(models), workers)
    return TorchBackend(models, device, workers)


def _one_view(tta: int) -> None:
    if tta != 1:
        raise ConfigError(f"--tta {tta}: an exported model predicts one view (its graph holds no TTA); use "
                          "--tta 1 or predict with the checkpoint")
