"""One transform factory with a `train` switch. Evaluation and prediction both call
`build_transform(..., train=False)` with the values stored in the checkpoint, so they cannot drift.

Images are HWC uint8 RGB face crops (square, from the crop stage). Augmentation runs on uint8 and
the pipeline returns HWC uint8; the dataset hands each image on as 3 x H x W uint8, so a loader
yields N x 3 x H x W uint8 batches: the model's shape at a quarter of the bytes of float batches.
`EvalResize` and `CropFlip` also write straight into a slot of a batch (`into`): the dataset then builds
a loader's batch in place, in channels-last memory, with the same pixels (`dataset.CropDataset.__getitems__`).
Normalisation comes last, on the device, in `normalize` (called by the training step and by
`engine.infer`, the only two places that feed a model).

The eval transform (`EvalResize`) is OpenCV alone, pixel for pixel albumentations' `Resize(...,
area_for_downscale="image")` (tests/test_transforms.py): predict with an exported model imports neither
albumentations (whose `__init__` imports albumentations.pytorch, so torch) nor torch. The `base`
preset's training transform (`CropFlip`) is OpenCV alone too: byte for byte albumentations'
`RandomResizedCrop` + `HorizontalFlip` under the same per-sample seed (tests/test_transforms.py), at a
third of the cost per item. albumentations is imported only for the `strong` preset, with its start-up
update check off (no network call).

Every transform is seeded per sample by `set_seed(seed)` (the dataset derives the seed from (seed,
epoch, index)), so an item is the same in any worker, process or resumed run.
"""
from __future__ import annotations

import math
import os
import random
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

    reads_only = True  # never writes its input (the dataset may pass a view of crops.npy)

    def __init__(self, size: int, interpolation: int):
        self.size, self.interpolation = size, interpolation

    def set_seed(self, seed: int) -> None:
        """Nothing random here (the datasets seed every transform per sample)."""

    def __call__(self, *, image: np.ndarray) -> dict:
        if image.shape[:2] == (self.size, self.size):
            return {"image": image}
        out = np.empty((self.size, self.size, *image.shape[2:]), image.dtype)
        self.into(image, out)
        return {"image": out}

    def into(self, image: np.ndarray, out: np.ndarray) -> None:
        """The same pixels as `__call__`, written into `out` (size x size x C uint8, C-contiguous: a
        slot of a loader's batch), so the batch needs no per-item array and no stack."""
        h, w = image.shape[:2]
        if (h, w) == (self.size, self.size):
            np.copyto(out, image)
            return
        shrink = self.size < h or self.size < w
        resize_into(image, out, cv2.INTER_AREA if shrink else self.interpolation)


class CropFlip:
    """The `base` preset's training transform: a random crop of scale `scale` (a fraction of the crop's
    area) and aspect ratio `ratio` (drawn log-uniformly), resized to size x size with `interpolation`,
    then a horizontal flip with probability 1/2.

    The draws are albumentations 2.0's own, in its order (the Compose's p, the box, the flip's p), from
    one `random.Random(seed)`: for any seed the output equals `A.Compose([A.RandomResizedCrop(...),
    A.HorizontalFlip(p=0.5)])` seeded with `set_random_state(np.random.default_rng(seed),
    random.Random(seed))`, pixel for pixel (tests/test_transforms.py). Its cost per 224 x 224 item is
    OpenCV's resize and flip, not a Compose's bookkeeping and a numpy Generator made per sample
    (bench/loader.py, BENCHMARKS §20)."""

    reads_only = True  # never writes its input

    def __init__(self, size: int, scale=(0.6, 1.0), ratio=(0.85, 1.18), interpolation: int = 1):
        self.size, self.scale, self.ratio, self.interpolation = size, scale, ratio, interpolation
        self._rng = random.Random(0)
        self._buf = None

    def set_seed(self, seed: int) -> None:
        self._rng.seed(seed)  # the state random.Random(seed) starts from, without a new object per item

    def box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(x, y, width, height) of the region to cut, drawn from the current random state."""
        r = self._rng
        r.random()  # the Compose's own apply-or-not draw (its p = 1): kept so the stream stays albumentations'
        area = h * w
        lo, hi = self.scale[0] * area, self.scale[1] * area
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = r.uniform(lo, hi)
            aspect = math.exp(r.uniform(log_lo, log_hi))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                y0, x0 = r.random(), r.random()
                return int((w - cw + 1) * x0), int((h - ch + 1) * y0), cw, ch
        if w / h < self.ratio[0]:  # no draw fitted: the central region of the nearest allowed ratio
            cw, ch = w, round(w / self.ratio[0])
        elif w / h > self.ratio[1]:
            cw, ch = round(h * self.ratio[1]), h
        else:
            cw, ch = w, h
        return (w - cw) // 2, (h - ch) // 2, cw, ch

    def __call__(self, *, image: np.ndarray) -> dict:
        return {"image": self.planes(image).transpose(1, 2, 0)}

    def into(self, image: np.ndarray, out: np.ndarray) -> None:
        """The augmented crop written into `out` (size x size x C uint8, C-contiguous: a slot of a loader's
        batch), read from `image` without writing it (a view of the memory-mapped crops.npy will do): the
        resize lands in the slot and the flip (albumentations' last draw) turns it in place."""
        x, y, cw, ch = self.box(*image.shape[:2])
        resize_into(image[y:y + ch, x:x + cw], out, self.interpolation)
        if self._rng.random() < 0.5:
            cv2.flip(out, 1, dst=out)

    def planes(self, image: np.ndarray) -> np.ndarray:
        """The augmented crop as a new contiguous 3 x size x size array (one item; a loader's batches go
        through `into`). The resize goes into a buffer kept between calls (a fresh 150 KB array per item
        would pay its page faults again), then splits into the planes."""
        shape = (self.size, self.size, image.shape[2])
        if self._buf is None or self._buf.shape != shape:
            self._buf = np.empty(shape, np.uint8)
        self.into(image, self._buf)
        out = np.empty((shape[2], self.size, self.size), np.uint8)
        cv2.split(self._buf, list(out))
        return out

    def __getstate__(self):  # a DataLoader worker gets its own buffer
        return {**self.__dict__, "_buf": None}


class _Seeded:
    """An albumentations pipeline behind `set_seed`: its two random states made from the sample's seed."""

    def __init__(self, compose):
        self.compose = compose

    def set_seed(self, seed: int) -> None:
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, *, image: np.ndarray) -> dict:
        return self.compose(image=image)


def build_transform(preset: str, img_size: int, train: bool, interpolation: str = "bilinear"):
    """The transform for a preset (OpenCV for eval and `base`, albumentations for `strong`).

    - eval (any preset with train=False, and preset 'none'): resize to img_size;
    - base: a random crop of 60-100% of the crop's area, resized, flipped half the time (`CropFlip`);
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
    if preset == "base":
        return CropFlip(img_size, interpolation=interp)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import would otherwise ask PyPI for a newer version
    import albumentations as A

    return _Seeded(A.Compose([
        A.RandomResizedCrop((img_size, img_size), scale=(0.6, 1.0), ratio=(0.85, 1.18), interpolation=interp),
        A.HorizontalFlip(p=0.5),  # the two steps of `base` (CropFlip), then:
        A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.8),
        A.Affine(rotate=(-12, 12), translate_percent=(-0.05, 0.05), scale=(0.9, 1.1), p=0.5),
        A.ToGray(p=0.1),
        A.GaussianBlur(blur_limit=(3, 5), p=0.1),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.08, 0.2), hole_width_range=(0.08, 0.2),
                        fill=0, p=0.5),
    ]))


def normalize(x: "torch.Tensor", mean=IMAGENET_MEAN, std=IMAGENET_STD, channels_last: bool = False) -> "torch.Tensor":
    """A loader batch, uint8 N x 3 x H x W (on any device) → float32 of the same shape, scaled to
    [0, 1] and standardised per channel. One conversion and two in-place passes."""
    import torch  # here, not at the top: predict with an ONNX model (inference/predictor.py) runs without torch

    if x.dim() != 4 or x.shape[1] != len(mean):
        raise ValueError(f"normalize takes loader batches of N x {len(mean)} x H x W, got {tuple(x.shape)}")
    scale, shift = (v.to(x.device) for v in normalize_factors(mean, std))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = x.to(dtype=torch.float32, memory_format=fmt, copy=True)
    return y.mul_(scale).sub_(shift)


def normalize_factors(mean, std) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(scale, shift), each 1 x C x 1 x 1 float32, with normalised = uint8 pixels * scale - shift: the one
    definition of the normalisation, which training, predict, explain and the exported graph all apply."""
    import torch

    scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0 * scale
    return scale, shift


def resize_into(image: np.ndarray, out: np.ndarray, interpolation: int) -> None:
    """cv2.resize of `image` to `out`'s size, written into `out`. OpenCV allocates a new array, silently,
    when `dst` does not fit (wrong shape, type or layout): that is refused here, or the slot would keep
    whatever it held."""
    if out.dtype != image.dtype or out.shape[2:] != image.shape[2:] or not out.flags.c_contiguous:
        raise ValueError(f"cannot resize a {image.dtype} {image.shape} image into a {out.dtype} {out.shape} slot")
    cv2.resize(image, (out.shape[1], out.shape[0]), dst=out, interpolation=interpolation)


def channels_first(img: np.ndarray) -> np.ndarray:
    """H x W x 3 → a contiguous 3 x H x W copy. cv2.split into the planes of one array: 8 µs for
    224 x 224 against 43 µs for numpy's strided transpose copy (measured), a fifth of a loader item."""
    out = np.empty((img.shape[2], *img.shape[:2]), img.dtype)
    cv2.split(np.ascontiguousarray(img), list(out))
    return out
