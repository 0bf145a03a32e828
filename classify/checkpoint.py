"""Self-describing checkpoints, loaded safely.

A checkpoint holds everything `predict` needs: the model's card (classify/inference/card.py: the
architecture, classes, eval transform, crop settings, calibration, provenance), its weights, the training
config and the epoch.
Only tensors and plain Python values go in, and loading uses `torch.load(weights_only=True)`: a
checkpoint cannot run code, and a pickle that tries is refused.
"""
from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path

import torch

from preprocess.imageio import atomic_write_bytes

from classify.errors import CheckpointError

FORMAT = "maskcls-checkpoint"
VERSION = 2  # 2: the model is described by its card (classify/inference/card.py); 1 still reads


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a crash or a full disk leaves the previous file intact."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def read_torch_file(path: Path, what: str, error=CheckpointError):
    """torch.load(path, weights_only=True), or `error` with one line that says what the file is
    instead: missing, empty, text, not a PyTorch file, truncated, or carrying code (refused, never
    run: torch's advice to pass weights_only=False is not passed on)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what}: no such file")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise error(f"{what} is an empty file, not a PyTorch file")
    if head.lstrip()[:1] in (b"{", b"["):
        raise error(f"{what} is text (JSON?), not a PyTorch file")
    is_zip, is_pickle = head[:4] == b"PK\x03\x04", head[:1] == b"\x80"
    if not (is_zip or is_pickle):
        kind = "text" if all(32 <= c < 127 or c in (9, 10, 13) for c in head) else "binary data"
        raise error(f"{what} is not a PyTorch file (it starts with {kind}: {head[:8]!r})")
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol other than its own: noise on the
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)  # user's terminal
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise error(f"{what} carries Python objects that would run code when loaded; refused "
                        "(maskcls only reads tensors and plain values)") from None
        raise error(f"{what} is a damaged PyTorch file ({str(e).splitlines()[0][:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise error(f"{what} is truncated or damaged (a PyTorch {'zip' if is_zip else 'pickle'} file that does not "
                    f"read to its end: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    ckpt = read_torch_file(path, str(path))
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        made = ""
        if isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            made = " (a bare state dict: pass it to `maskcls train --weights` instead)"
        raise CheckpointError(f"{path} is a PyTorch file but not a maskcls checkpoint (made by another tool?): it has no "
                              f"'format': '{FORMAT}' entry{made}")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer maskcls (checkpoint version {ckpt['version']})")
    return ckpt
