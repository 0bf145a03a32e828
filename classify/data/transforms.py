"""One transform factory with a `train` switch. Evaluation and prediction both call
`build_transform(..., train=False)` with the values stored in the checkpoint, so they cannot drift.

Images are HWC uint8 RGB face crops (square, from the crop stage). Augmentation runs on uint8 and
the pipeline returns HWC uint8; the dataset hands each image on as 3 x H x W uint8, so a loader
yields N x 3 x H x W uint8 batches: the model's shape at a quarter of the bytes of float batches.
Normalisation comes last, on the device, in `normalize` (called by the training step and by
`engine.infer`, the only two places that feed a model).

The eval transform (`EvalResize`) is OpenCV alone, pixel for pixel albumentations' `Resize(...,
area_for_downscale="image")` (tests/test_transforms.py): predict with an exported model imports neither
albumentations (whose `__init__` imports albumentations.pytorch, so torch) nor torch. albumentations is
imported only for training augmentation, with its start-up update check off (no network call).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = ("base", "strong", "none")
INTERPOLATIONS = {"bilinear": 1, "bicubic": 2}  # cv2.INTER_LINEAR, cv2.INTER_CUBIC


class EvalResize:
    """The eval transform: a crop resized to size x size, shrunk with INTER_AREA (no aliasing), enlarged
    with `interpolation`. Called as albumentations pipelines are: `t(image=rgb)["image"]`."""

    def __init__(self, size: int, interpolation: int):
        self.size, self.interpolation = size, interpolation

    def set_random_state(self, *rngs) -> None:
        """Nothing random here (the datasets seed every transform per sample, as albumentations' Compose)."""

    def __call__(self, *, image: np.ndarray) -> dict:
        h, w = image.shape[:2]
        if (h, w) == (self.size, self.size):
            return {"image": image}
        shrink = self.size < h or self.size < w
        return {"image": cv2.resize(image, (self.size, self.size),
                                    interpolation=cv2.INTER_AREA if shrink else self.interpolation)}


def build_transform(preset: str, img_size: int, train: bool, interpolation: str = "bilinear"):
    """The albumentations pipeline for a preset.

    - eval (any preset with train=False, and preset 'none'): resize to img_size;
    - base: RandomResizedCrop of the crop's central region (scale 0.6-1), horizontal flip;
    - strong: base + colour jitter, small affine, grey, blur, coarse dropout (cutout).

    `interpolation` is the pretrained weights' own (stored in the checkpoint). The eval resize
    shrinks with INTER_AREA, which does not alias, and enlarges with `interpolation`.

    >>> t = build_transform("base", 224, train=False)
    >>> t(image=crop_uint8)["image"].shape   # (224, 224, 3), uint8
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    interp = INTERPOLATIONS[interpolation]
    if not train or preset == "none":
        return EvalResize(img_size, interp)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import would otherwise ask PyPI for a newer version
    import albumentations as A

    ops = [A.RandomResizedCrop((img_size, img_size), scale=(0.6, 1.0), ratio=(0.85, 1.18), interpolation=interp),
           A.HorizontalFlip(p=0.5)]
    if preset == "strong":
        ops += [
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.8),
            A.Affine(rotate=(-12, 12), translate_percent=(-0.05, 0.05), scale=(0.9, 1.1), p=0.5),
            A.ToGray(p=0.1),
            A.GaussianBlur(blur_limit=(3, 5), p=0.1),
            A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.08, 0.2), hole_width_range=(0.08, 0.2),
                            fill=0, p=0.5),
        ]
    return A.Compose(ops)


def normalize(x: "torch.Tensor", mean=IMAGENET_MEAN, std=IMAGENET_STD, channels_last: bool = False) -> "torch.Tensor":
    """A loader batch, uint8 N x 3 x H x W (on any device) → float32 of the same shape, scaled to
    [0, 1] and standardised per channel. One conversion and two in-place passes."""
    import torch  # here, not at the top: predict with an ONNX model (inference/predictor.py) runs without torch

    if x.dim() != 4 or x.shape[1] != len(mean):
        raise ValueError(f"normalize takes loader batches of N x {len(mean)} x H x W, got {tuple(x.shape)}")
    scale = 1.0 / (255.0 * torch.tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1))
    shift = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0 * scale
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = x.to(dtype=torch.float32, memory_format=fmt, copy=True)
    return y.mul_(scale).sub_(shift)


def channels_first(img: np.ndarray) -> np.ndarray:
    """H x W x 3 → a contiguous 3 x H x W copy. cv2.split into the planes of one array: 8 µs for
    224 x 224 against 43 µs for numpy's strided transpose copy (measured), a fifth of a loader item."""
    out = np.empty((img.shape[2], *img.shape[:2]), img.dtype)
    cv2.split(np.ascontiguousarray(img), list(out))
    return out
