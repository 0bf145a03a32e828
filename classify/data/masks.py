"""Synthetic face masks drawn from MTCNN's five landmarks: `train --synth-mask P`, the report's preview,
and the test and benchmark photo generators (tests/synth.py) all draw with `draw_mask`.

A mask covers the lower face between the landmarks: for `wear` from just below the eyes (over the
nose) to below the chin; for `incorrect` from below the nose (the nose stays bare). Shapes, colours
and textures vary (`random_style`), so a model cannot learn one synthetic look as "mask".

`synthesize(img, landmarks, label, rng)` is what training does to an unmasked crop: it draws a mask
(incorrect with probability SYNTH_INCORRECT, else wear) and returns the new 18-class label, the same
person's gender and age group with the new mask status.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from preprocess import labels as L

# The colours of tests/synth.py's masks (white, blue, black, pink, olive, red), then random ones.
MASK_COLOURS = [(235, 235, 240), (150, 190, 230), (30, 30, 35), (230, 170, 190), (90, 120, 90), (200, 60, 60)]
SHAPES = ("pleated", "kn95", "cloth")
TEXTURES = ("plain", "noise", "stripes", "dots")
# Of the unmasked crops turned into masked ones, the share made `incorrect` (the rarer class: one photo
# in seven, against five `wear`); the rest become `wear`.
SYNTH_INCORRECT = 0.5


@dataclass(frozen=True)
class MaskStyle:
    shape: str = "pleated"
    colour: tuple[int, int, int] = MASK_COLOURS[0]
    texture: str = "plain"


def random_style(rng: np.random.Generator) -> MaskStyle:
    colour = MASK_COLOURS[rng.integers(len(MASK_COLOURS))] if rng.random() < 0.6 else \
        tuple(int(v) for v in rng.integers(20, 246, 3))
    return MaskStyle(SHAPES[rng.integers(len(SHAPES))], colour, TEXTURES[rng.integers(len(TEXTURES))])


def face_box(pts: np.ndarray) -> tuple[float, float, float, float]:
    """A face box estimated from the landmarks alone (eyes, nose, mouth corners), as MTCNN would draw
    it: 2.2 eye distances wide, from 1.05 eye-to-mouth heights above the eyes to 0.75 below the mouth
    (fitted on the faces in tests/assets/faces)."""
    pts = np.asarray(pts, float).reshape(5, 2)
    d = float(np.linalg.norm(pts[1] - pts[0]))
    cx = (pts[0, 0] + pts[1, 0]) / 2
    eye_y, mouth_y = (pts[0, 1] + pts[1, 1]) / 2, (pts[3, 1] + pts[4, 1]) / 2
    em = max(mouth_y - eye_y, 1.0)
    return cx - 1.1 * d, eye_y - 1.05 * em, cx + 1.1 * d, mouth_y + 0.75 * em


def _span(pts, kind: str, box):
    """(face box, face width, the mask's top and bottom y, the nose's x, the mouth's y)."""
    pts = np.asarray(pts, float).reshape(5, 2)
    x1, y1, x2, y2 = box if box is not None else face_box(pts)
    eye_y = (pts[0, 1] + pts[1, 1]) / 2
    nose_x, nose_y = pts[2]
    mouth_y = (pts[3, 1] + pts[4, 1]) / 2
    top = nose_y - 0.45 * (nose_y - eye_y) if kind == "wear" else nose_y + 0.45 * (mouth_y - nose_y)
    return (x1, y1, x2, y2), x2 - x1, top, y2 + 0.04 * (y2 - y1), nose_x, mouth_y


def mask_polygon(pts, kind: str, box=None, shape: str = "pleated") -> np.ndarray:
    """The mask's outline (K x 2 int32) for landmarks `pts` (5 x 2: eyes, nose, mouth corners)."""
    (x1, _, x2, _), fw, top, bottom, nose_x, mouth_y = _span(pts, kind, box)
    if shape == "cloth":  # rounded: an upper arc from cheek to cheek, a lower half-ellipse to the chin
        t = np.linspace(0, np.pi, 12)
        upper = np.stack([nose_x - 0.48 * fw * np.cos(t), top + 0.1 * fw * np.abs(np.cos(t))], 1)
        lower = np.stack([nose_x + 0.46 * fw * np.cos(t), mouth_y + (bottom - mouth_y) * np.sin(t)], 1)
        return np.concatenate([upper, lower]).astype(np.int32)
    poly = [[x1 + 0.02 * fw, top + 0.12 * fw], [nose_x, top], [x2 - 0.02 * fw, top + 0.12 * fw],
            [x2 - 0.06 * fw, mouth_y + 0.25 * (bottom - mouth_y)], [nose_x + 0.2 * fw, bottom],
            [nose_x - 0.2 * fw, bottom], [x1 + 0.06 * fw, mouth_y + 0.25 * (bottom - mouth_y)]]
    if shape == "kn95":  # a pointed chin
        poly[4:6] = [[nose_x, bottom + 0.06 * fw]]
    return np.array(poly, np.int32)


def draw_mask(img: np.ndarray, pts, kind: str = "wear", style: MaskStyle = MaskStyle(), box=None,
              rng: np.random.Generator | None = None) -> np.ndarray:
    """A copy of `img` (H x W x 3 uint8 RGB) with a face mask drawn from the landmarks `pts` (5 x 2);
    `kind` 'wear' covers nose to chin, 'incorrect' sits below the nose. `box` (x1, y1, x2, y2), when
    known, sizes the mask; otherwise it is estimated from the landmarks."""
    if kind not in ("wear", "incorrect"):
        raise ValueError(f"kind must be 'wear' or 'incorrect', not {kind!r}")
    img = img.copy()
    poly = mask_polygon(pts, kind, box, style.shape)
    colour = tuple(int(c) for c in style.colour)
    cv2.fillPoly(img, [poly], colour, lineType=cv2.LINE_AA)
    (x1, _, x2, _), fw, top, bottom, nose_x, _ = _span(pts, kind, box)
    shade = tuple(int(c * 0.8) for c in colour)
    if style.shape == "pleated":
        for k in (1, 2, 3):  # pleats
            y = int(top + k * (bottom - top) / 4.5)
            cv2.line(img, (int(x1 + 0.1 * fw), y), (int(x2 - 0.1 * fw), y), shade, 2, cv2.LINE_AA)
    elif style.shape == "kn95":  # the middle seam
        cv2.line(img, (int(nose_x), int(top)), (int(nose_x), int(bottom)), shade, 2, cv2.LINE_AA)
    if style.texture != "plain":
        rng = rng or np.random.default_rng(0)
        inside = np.zeros(img.shape[:2], np.uint8)
        cv2.fillPoly(inside, [poly], 1)
        texture = np.zeros(img.shape[:2], np.float32)
        if style.texture == "noise":
            texture = rng.normal(0, 12, img.shape[:2]).astype(np.float32)
        else:
            yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
            period = max(3, int(fw / 10))
            if style.texture == "stripes":
                texture = np.where((yy // period) % 2 == 0, -25, 0).astype(np.float32)
            else:
                texture = np.where(((yy % period) < period // 3) & ((xx % period) < period // 3), -40, 0).astype(np.float32)
        sel = inside.astype(bool)
        img[sel] = np.clip(img[sel].astype(np.float32) + texture[sel, None], 0, 255).astype(np.uint8)
    return img


def synthesize(img: np.ndarray, landmarks, label: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """An unmasked crop (label's mask status 'not wear') with a random mask drawn from its landmarks,
    and its new label: the same gender and age group, mask `incorrect` (probability SYNTH_INCORRECT) or `wear`."""
    mask, gender, age = L.decode(label)
    if mask != 2:
        raise ValueError("only an unmasked photo (mask status 'not wear') gets a synthetic mask")
    kind = "incorrect" if rng.random() < SYNTH_INCORRECT else "wear"
    out = draw_mask(img, np.asarray(landmarks, float).reshape(5, 2), kind, random_style(rng), rng=rng)
    return out, L.encode(1 if kind == "incorrect" else 0, gender, age)
