"""The one inference function: validation during training, `evaluate` and `predict` all call it,
on datasets built with the one eval transform, so their numbers cannot disagree. It returns logits:
what becomes of them (temperature, TTA mean, vote) is `answer.answer`, for every backend."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from classify.errors import ConfigError
from classify.data.dataset import collate
from classify.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

AMP_MODES = ("auto", "bf16", "fp16", "off")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_workers(processes: int = 1) -> int:
    """DataLoader workers per process: the cores this process may use, shared by the processes of
    the machine, less one for the process itself; at least 1, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(8, cores // max(processes, 1) - 1))


class EpochOrder(Sampler):
    """A sampler whose order is set before each epoch, yielding (index, epoch) keys: a persistent
    worker cannot see the main process's dataset change, so the epoch (which seeds augmentation)
    travels with each index."""

    def __init__(self, order=(), epoch: int = 0):
        self.set(order, epoch)

    def set(self, order, epoch: int) -> None:
        self.order, self.epoch = list(order), epoch

    def __iter__(self):
        return iter([(i, self.epoch) for i in self.order])

    def __len__(self) -> int:
        return len(self.order)


def make_loader(ds: Dataset, batch_size: int, workers: int, device: torch.device, sampler=None,
                persistent: bool = False) -> DataLoader:
    """A loader of uint8 N x 3 x H x W batches (a CropDataset's built in place, in channels-last memory:
    `dataset.collate`). `persistent`: workers live for the whole run (set the order of an `EpochOrder`
    sampler per epoch) instead of starting anew each epoch."""
    # Its own generator: a loader must not draw from the global RNG (dropout's), or a run resumed
    # mid-way would draw differently from an uninterrupted one. Augmentation is seeded per sample.
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      collate_fn=collate, pin_memory=device.type == "cuda", drop_last=False,
                      generator=torch.Generator().manual_seed(0), persistent_workers=persistent and workers > 0)


def resolve_amp(amp, device: torch.device) -> str:
    """'bf16', 'fp16' or 'off' for an --amp value on `device`. auto: bf16 where the GPU computes it
    natively (compute capability 8.0+: A100, H100, RTX 30xx on), else fp16 with a GradScaler in training:
    `torch.cuda.is_bf16_supported()` also counts emulated bf16 (V100, T4), which is slow. Mixed
    precision is for CUDA only (off on the CPU). Older configs said True/False."""
    amp = {True: "auto", False: "off"}.get(amp, amp)
    if amp not in AMP_MODES:
        raise ConfigError(f"--amp {amp!r}: choose one of {', '.join(AMP_MODES)}")
    if device.type != "cuda" or amp == "off":
        return "off"
    if amp == "auto":
        return "bf16" if native_bf16(device) else "fp16"
    return amp


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU has bf16 arithmetic in hardware (compute capability 8.0 or later)."""
    return torch.cuda.get_device_capability(device) >= (8, 0) and torch.cuda.is_bf16_supported()


def autocast(device: torch.device, amp: str):
    """Autocast to `amp` ('bf16' | 'fp16') on CUDA; nothing for 'off' or on the CPU."""
    if amp in _DTYPES and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=_DTYPES[amp])
    return contextlib.nullcontext()


@torch.no_grad()
def infer(model: torch.nn.Module, loader: DataLoader, device: torch.device, tta: int = 1, amp: str = "off",
          mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(manifest indices N, logits V x N x 18 as float64) of every item of `loader`.

    tta = number of views V: 1 the image; 2 + its horizontal mirror; 3 + a 90% centre zoom; 4 + the
    zoom's mirror (`answer.model_probs` averages their probabilities)."""
    model.eval()
    idx, logits = [], []
    for x, _, i in loader:
        x = normalize(x.to(device, non_blocking=True), mean, std, channels_last=device.type == "cuda")
        views = []
        for v in tta_views(x, tta):
            with autocast(device, amp):
                views.append(model(v)["label"].float())
        logits.append(torch.stack(views).double().cpu())
        idx.append(torch.as_tensor(i))
    if not logits:
        return np.zeros(0, int), np.zeros((tta, 0, 18))
    return torch.cat(idx).numpy(), torch.cat(logits, dim=1).numpy()


def tta_views(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    if not 1 <= n <= 4:
        raise ValueError(f"tta must be 1..4 views, got {n}")
    views = [x, torch.flip(x, dims=[3])]
    if n > 2:
        s = x.shape[-1]
        m = round(s * 0.05)
        z = torch.nn.functional.interpolate(x[..., m:s - m, m:s - m], size=x.shape[-2:], mode="bilinear",
                                            align_corners=False)
        views += [z, torch.flip(z, dims=[3])]
    return views[:n]
