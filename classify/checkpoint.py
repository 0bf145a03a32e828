"""Self-describing checkpoints, loaded safely.

A checkpoint holds everything `predict` needs: model name and arguments, class names per task,
image size, normalisation, the eval preset, the crop settings, the training config and the epoch.
Only tensors and plain Python values go in, and loading uses `torch.load(weights_only=True)`: a
checkpoint cannot run code, and a pickle that tries is refused.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from preprocess.imageio import atomic_write_bytes

from .errors import CheckpointError

FORMAT = "maskcls-checkpoint"
VERSION = 1


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a crash or a full disk leaves the previous file intact."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure here means "not a safe, readable checkpoint"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            msg = "it contains Python objects that would run code when loaded, so it was refused"
        raise CheckpointError(f"{path} cannot be loaded as a maskcls checkpoint: {msg}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a maskcls checkpoint (made by another tool?): it has no "
                              f"'format': '{FORMAT}' entry")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer maskcls (checkpoint version {ckpt['version']})")
    return ckpt
