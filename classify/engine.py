"""The one inference function: validation during training, `evaluate` and `predict` all call it,
on datasets built with the one eval transform, so their numbers cannot disagree."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .transforms import IMAGENET_MEAN, IMAGENET_STD, normalize


def make_loader(ds: Dataset, batch_size: int, workers: int, device: torch.device, sampler=None) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=False)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled (no loss scaling needed); nothing on the CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def infer(model: torch.nn.Module, loader: DataLoader, device: torch.device, tta: int = 1, amp: bool = False,
          mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(manifest indices, probabilities N x 18 as float64) of every item of `loader`.

    tta = number of views averaged by probability: 1 the image; 2 + its horizontal mirror;
    3 + a 90% centre zoom; 4 + the zoom's mirror."""
    model.eval()
    idx, probs = [], []
    for x, _, i in loader:
        x = normalize(x.to(device, non_blocking=True), mean, std, channels_last=device.type == "cuda")
        views = tta_views(x, tta)
        p = 0
        for v in views:
            with autocast(device, amp):
                p = p + model(v)["label"].float().softmax(-1)
        probs.append((p / len(views)).double().cpu())
        idx.append(torch.as_tensor(i))
    if not probs:
        return np.zeros(0, int), np.zeros((0, 18))
    return torch.cat(idx).numpy(), torch.cat(probs).numpy()


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
