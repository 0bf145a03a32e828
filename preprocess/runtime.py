"""Choosing the device once, and the process's place in a torchrun job."""
from __future__ import annotations

import os

import torch


class DeviceError(Exception):
    pass


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → cuda when available, else cpu. Asking for cuda without one is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    return dev


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))

