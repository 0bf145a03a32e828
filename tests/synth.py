"""Synthetic competition-style photos with a known face box, made from the public-domain faces in
tests/assets/faces (see SOURCES.md there). Used by data_samples/make_samples.py, the benchmarks and
the tests. Masks are drawn from the faces' MTCNN landmarks (stored in landmarks.json, so generating
needs no detector) by `classify.data.masks.draw_mask`, the same code as `train --synth-mask`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from classify.data.masks import MASK_COLOURS, MaskStyle, draw_mask
from preprocess.subject import iou  # noqa: F401 (the benchmarks and tests take it from here)

ASSETS = Path(__file__).resolve().parent / "assets" / "faces"
W, H = 384, 512



@dataclass
class Source:
    name: str
    rgb: np.ndarray
    box: np.ndarray        # x1 y1 x2 y2
    landmarks: np.ndarray  # 5 x 2


def sources() -> list[Source]:
    meta = json.loads((ASSETS / "landmarks.json").read_text())
    out = []
    for name, m in meta.items():
        bgr = cv2.imread(str(ASSETS / name), cv2.IMREAD_COLOR)
        out.append(Source(name.rsplit(".", 1)[0], cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB),
                          np.array(m["box"], float), np.array(m["landmarks"], float)))
    return out


def compose(src: Source, rng: np.random.Generator, face_w: float | None = None, centre=None, flip=False,
            size=(W, H), jitter=True):
    """A size[0] x size[1] photo with src's face scaled to `face_w` pixels wide at `centre`.
    Returns (rgb, box, landmarks) in the new photo's pixels."""
    w, h = size
    face_w = face_w if face_w is not None else rng.uniform(0.38, 0.5) * w
    cx, cy = centre if centre is not None else (w / 2 + rng.uniform(-20, 20), h * 0.42 + rng.uniform(-20, 20))
    bx1, by1, bx2, by2 = src.box
    s = face_w / (bx2 - bx1)
    sx = -s if flip else s
    src_cx, src_cy = (bx1 + bx2) / 2, (by1 + by2) / 2
    M = np.array([[sx, 0, cx - sx * src_cx], [0, s, cy - s * src_cy]])
    img = cv2.warpAffine(src.rgb, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    pts = np.c_[src.landmarks, np.ones(5)] @ M.T
    if flip:
        pts = pts[[1, 0, 2, 4, 3]]  # left/right swap places under a mirror
    corners = np.array([[bx1, by1, 1], [bx2, by2, 1]]) @ M.T
    box = np.array([corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(), corners[:, 1].max()])
    if jitter:
        gain = rng.uniform(0.8, 1.2, size=3)
        img = np.clip(img.astype(np.float32) * gain + rng.uniform(-15, 15), 0, 255).astype(np.uint8)
    return img, box, pts


def person_photos(src: Source, rng: np.random.Generator, flip=False, size=(W, H), bystander: Source | None = None,
                  details: dict | None = None):
    """The seven photos of one synthetic person: {stem: (rgb, true_box)}; they share framing, as in the data.

    `bystander`: a second, unmasked face partly in frame at one side of most photos (a person behind,
    a poster), roughly where it was in the person's other photos. `details`, when given, receives per
    stem the bystander's box (None where it is not in the photo)."""
    face_w = rng.uniform(0.38, 0.5) * size[0]
    centre = (size[0] / 2 + rng.uniform(-20, 20), size[1] * 0.42 + rng.uniform(-20, 20))
    place = _bystander_place(rng, face_w, size) if bystander is not None else None
    out = {}
    for k, stem in enumerate(["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]):
        c = (centre[0] + rng.uniform(-6, 6), centre[1] + rng.uniform(-6, 6))
        img, box, pts = compose(src, rng, face_w * rng.uniform(0.96, 1.04), c, flip, size)
        if stem != "normal":
            colour = MASK_COLOURS[k % len(MASK_COLOURS)]
            img = draw_mask(img, pts, "wear" if stem.startswith("mask") else "incorrect", MaskStyle(colour=colour), box=box)
        other = None
        if place is not None and rng.random() < 0.85:
            img, other = add_face(img, bystander, rng, place, keep_clear=box)
        if details is not None:
            details[stem] = other
        out[stem] = (img, box)
    return out


def _bystander_place(rng: np.random.Generator, face_w: float, size) -> tuple[float, float, float]:
    """(centre x, centre y, face width) of a bystander: at the left or right edge, 10-35% of it out of
    frame, 55-80% of the subject's size, in the upper half."""
    w, h = size
    bw = face_w * rng.uniform(0.55, 0.8)
    cx = bw * (0.5 - rng.uniform(0.1, 0.35))
    if rng.random() < 0.5:
        cx = w - cx
    return cx, h * rng.uniform(0.18, 0.4), bw


def add_face(img: np.ndarray, src: Source, rng: np.random.Generator, place, keep_clear=None):
    """Paste src's bare face (feathered ellipse) at place = (cx, cy, face width), jittered a little, behind
    the box `keep_clear` (the subject stays in front). Returns (rgb, the pasted face's box clipped to the photo)."""
    h, w = img.shape[:2]
    cx, cy, fw = place
    layer, box, _ = compose(src, rng, fw * rng.uniform(0.96, 1.04), (cx + rng.uniform(-10, 10), cy + rng.uniform(-10, 10)),
                            bool(rng.integers(2)), (w, h))
    alpha = np.zeros((h, w), np.float32)
    ecx, ecy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    axes = (int((box[2] - box[0]) * 0.62), int((box[3] - box[1]) * 0.72))
    cv2.ellipse(alpha, (int(ecx), int(ecy)), axes, 0, 0, 360, 1.0, -1)
    alpha = cv2.GaussianBlur(alpha, (0, 0), 6)
    if keep_clear is not None:
        x1, y1, x2, y2 = keep_clear
        pad = 0.15 * (x2 - x1)
        alpha[max(0, int(y1 - pad)):int(y2 + pad), max(0, int(x1 - pad)):int(x2 + pad)] = 0
    out = (img * (1 - alpha[..., None]) + layer * alpha[..., None]).astype(np.uint8)
    return out, np.array([max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3])])


def save(path: Path, rgb: np.ndarray, quality: int = 85) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix.lower() in (".jpg", ".jpeg") else []
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)


def swap_incorrect_and_normal(crops: Path, persons) -> None:
    """The competition's known label error, made on purpose (bench/audit.py, tests/test_audit.py): these
    persons' incorrect_mask and normal photos carry each other's mask label in the crops' manifest."""
    from preprocess import labels as L
    from preprocess.manifest import read_manifest, read_meta, write_manifest

    rows = read_manifest(crops)
    for r in rows:
        if r["person_id"] in persons and r["mask"] in (1, 2):
            r["mask"] = 3 - r["mask"]
            r["label"] = L.encode(r["mask"], r["gender"], r["age_group"])
    write_manifest(crops, rows, read_meta(crops))
