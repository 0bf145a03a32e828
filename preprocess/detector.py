"""The face detector: the one place that knows about MTCNN, its device, its pyramid and batching.

`FaceDetector` is a protocol: anything with `settings` (a dict that goes into the crop cache key) and
`detect(images, relaxed=False) -> list[list[Face]]` (every face found in each photo, best first; an
empty list when none) will do, which is how tests inject a fake. Which face is the photo's subject is
not the detector's business: `subject.py` decides, from the person's other photos and a prior.

Speed on the CPU comes from the pyramid, not from cleverness: a competition photo is 384x512 with one
face filling a large part of it, so MTCNN's default (`min_face_size=20` on the full photo, 0.709
steps) spends most of its time on P-Net scales that look for 20-pixel faces that are never there.
`MTCNNDetector` runs on a copy scaled so its longer side is `detect_side` pixels, with the minimum
face size a fraction of the shorter side, and maps boxes back to the photo's pixels. Photos of equal
size go through P-Net/R-Net/O-Net together in batches (on the GPU this is where the speed comes from),
in `mtcnn.detect_batch` (facenet-pytorch's weights; see that module for why not its own `detect`): on
the CPU the nets run in OpenCV (`mtcnn.CvNets`, no torch import), on CUDA in torch (`mtcnn_torch`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Protocol, Sequence

import cv2
import numpy as np

from .mtcnn import CvNets, Nets, detect_batch
from .runtime import device_name

SETTINGS_VERSION = "lean-3"  # in the settings (the cache key): bump when detection output changes


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the photo's pixels
    score: float
    landmarks: tuple[tuple[float, float], ...] | None = None  # eyes, nose, mouth corners


class FaceDetector(Protocol):
    settings: dict

    def detect(self, images: Sequence[np.ndarray], relaxed: bool = False) -> list[list[Face]]: ...


def build_detector(settings: dict, device: str = "auto", batch_size: int = 32) -> MTCNNDetector:
    """The detector that `settings` (a crops.json's or a checkpoint's `detector` entry) describes, on
    `device`: how predict crops new photos exactly as the training photos were cropped."""
    if settings.get("detector") != "mtcnn":
        raise ValueError(f"the crops were made with detector {settings.get('detector')!r}, which cannot be rebuilt; "
                         "crop the photos yourself and pass the crops folder")
    return MTCNNDetector(device=device, detect_side=settings["detect_side"], min_face=settings["min_face"],
                         thresholds=tuple(settings["thresholds"]),
                         relaxed_thresholds=tuple(settings["relaxed_thresholds"]), factor=settings["factor"],
                         batch_size=batch_size)


class MTCNNDetector:
    """MTCNN (facenet-pytorch's weights, `mtcnn.detect_batch`) with a speed-tuned pyramid and equal-size batching.

    >>> det = MTCNNDetector(device="cpu")
    >>> faces = det.detect([rgb_uint8_array])   # [[Face(box=(x1, y1, x2, y2), score=0.99, ...), ...]], [[]] if none

    `engine`: 'auto' runs the nets in OpenCV on the CPU and in torch on CUDA; 'torch' forces torch
    (on the CPU too: how the tests check the GPU path's code without a GPU).
    """

    def __init__(self, device: str = "auto", detect_side: int = 256, min_face: float = 0.3,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 relaxed_thresholds: tuple[float, float, float] = (0.3, 0.4, 0.4),
                 factor: float = 0.709, batch_size: int = 32, engine: str = "auto"):
        if engine not in ("auto", "torch"):
            raise ValueError(f"engine must be 'auto' or 'torch', not {engine!r}")
        self.device = device_name(device)  # a string: on the CPU, torch is never imported
        self.engine = "opencv" if engine == "auto" and self.device == "cpu" else "torch"
        self.detect_side, self.min_face, self.batch_size = detect_side, min_face, batch_size
        self._args = (list(thresholds), factor)
        self._net = None  # loaded on the first detect(): a fully cached run never pays for it
        # The relaxed pass: lower thresholds (masked faces lose R-/O-Net confidence, not size) and a
        # minimum face of 2/3 of the first pass's, same pyramid step.
        self._relaxed = (list(relaxed_thresholds), max(min_face * 2 / 3, 0.05), factor)
        self.settings = {"detector": "mtcnn", "impl": SETTINGS_VERSION, "detect_side": detect_side, "min_face": min_face,
                         "thresholds": list(thresholds), "relaxed_thresholds": list(relaxed_thresholds),
                         "factor": factor}

    def _nets(self) -> Nets:
        if self._net is None and self.engine == "opencv":
            try:
                self._net = CvNets()
            except cv2.error as e:  # an OpenCV build whose DNN module cannot read the graph
                warnings.warn(f"OpenCV {cv2.__version__} could not load MTCNN into its DNN module "
                              f"({(str(e).strip().splitlines() or ['?'])[-1]}); detecting with torch on the CPU "
                              "instead (same faces, ~2 s more per run). opencv-python-headless 4.10-5.0 are tested.",
                              RuntimeWarning, stacklevel=2)
                self.engine = "torch"
        if self._net is None:
            from .mtcnn_torch import TorchNets  # imports torch: CUDA, engine='torch', or the fallback above
            self._net = TorchNets(self.device)
        return self._net

    def detect(self, images: Sequence[np.ndarray], relaxed: bool = False) -> list[list[Face]]:
        results: list[list[Face]] = [[] for _ in images]
        scaled, scales = [], []
        for img in images:
            h, w = img.shape[:2]
            s = min(1.0, self.detect_side / max(h, w)) if self.detect_side else 1.0
            size = (max(1, round(w * s)), max(1, round(h * s)))  # a thin photo never resizes to 0 pixels
            scaled.append(img if s == 1.0 else cv2.resize(img, size, interpolation=cv2.INTER_AREA))
            scales.append(s)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(scaled):
            groups.setdefault(img.shape[:2], []).append(i)
        nets = self._nets()
        thresholds, factor = self._args
        frac = self.min_face
        if relaxed:
            thresholds, frac, factor = self._relaxed
        for (h, w), idx in groups.items():
            min_face = max(12, int(frac * min(h, w)))
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                found = detect_batch(nets, np.stack([scaled[i] for i in chunk]), min_face, thresholds, factor)
                for i, (boxes, probs, points) in zip(chunk, found):
                    results[i] = [Face(box=tuple(float(v) / scales[i] for v in b), score=float(p),
                                       landmarks=tuple((float(x) / scales[i], float(y) / scales[i]) for x, y in lm))
                                  for b, p, lm in zip(boxes, probs, points)]
        return results
