"""Crop geometry: the square around a face box, cutting it out of a photo, and landmarks in crop pixels.

A crop is the square of side max(box w, h) x (1 + 2 margin) centred on the face box, padded by edge
replication where it leaves the photo, resized to `size` (INTER_AREA when shrinking).
"""
from __future__ import annotations

from typing import Iterable

import cv2
import numpy as np


def square_around(box: Iterable[float], margin: float) -> tuple[float, float, float]:
    """(cx, cy, side) of the square crop around a face box, `margin` x box side added on each side."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    return (x1 + x2) / 2, (y1 + y2) / 2, max(side, 8.0)


def square_region(cx: float, cy: float, side: float) -> tuple[int, int, int, int]:
    """The pixels (x0, y0, x1, y1; end exclusive) `crop_square` cuts for the square (cx, cy, side)."""
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = int(round(side))
    return x0, y0, x0 + s, y0 + s


def crop_square(img: np.ndarray, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Cut the square (cx, cy, side) out of `img`, replicating edges outside it, and resize to size x size."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = square_region(cx, cy, side)
    s = x1 - x0
    pad = max(0, -x0, -y0, x1 - w, y1 - h)
    if pad:
        img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        x0, y0, x1, y1 = x0 + pad, y0 + pad, x1 + pad, y1 + pad
    patch = img[y0:y1, x0:x1]
    interp = cv2.INTER_AREA if s > size else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interp)


def crop_landmarks(lm: list[float] | None, box, margin: float, size: int) -> list[float] | None:
    """The five landmarks (x, y, ...) in the crop's pixels, as `crop_square` cuts it."""
    if not lm:
        return None
    x0, y0, x1, _ = square_region(*square_around(box, margin))
    k = size / (x1 - x0)
    return [round((v - (x0 if i % 2 == 0 else y0)) * k, 1) for i, v in enumerate(lm)]
