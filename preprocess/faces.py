"""Finding the subject's face in a chunk of photos: the detector's fast pass, the choice of the subject
among the faces found (`subject.py`), and a relaxed pass where the subject was not found.

A detection record per photo (what `crop.py` journals) is `{"w", "h", "cands": [[x1, y1, x2, y2, score,
pass, landmarks], ...], "relaxed": whether the relaxed pass ran}`, or `{"error": why}` for a photo
without pixels. `crop_lone_photos` runs the same passes on photos in memory (what `maskcls serve`
answers with).
"""
from __future__ import annotations

import numpy as np

from .detector import FaceDetector
from .geometry import crop_square, square_around
from .imageio import decode_jpeg, encode_jpeg
from .subject import Candidate, Choice, Prior, choose_for_person, choose_lone, iou


def detect_and_choose(chunk, images, dets, detector: FaceDetector, prior: Prior) -> list[list[Choice | None]]:
    """Detect the photos without a cached detection, choose each unit's subject, and run the relaxed
    pass where the subject was not found; per unit, its photos' choices."""
    fresh = [(ui, pi) for ui, (_, _, cached) in enumerate(chunk) for pi, im in enumerate(images[ui])
             if cached[pi] is None and isinstance(im, np.ndarray)]
    _add_faces(detector, images, dets, fresh, relaxed=False)
    # The relaxed pass, for photos whose subject the fast pass did not find (a fallback box).
    chosen = [choose_unit(unit, dets[ui], prior) for ui, (unit, _, _) in enumerate(chunk)]
    again = [(ui, pi) for ui, choices in enumerate(chosen) for pi, c in enumerate(choices)
             if c is not None and c.index is None and not dets[ui][pi]["relaxed"]]
    _add_faces(detector, images, dets, again, relaxed=True)
    for ui in {ui for ui, _ in again}:  # the units whose candidates the relaxed pass changed
        chosen[ui] = choose_unit(chunk[ui][0], dets[ui], prior)
    return chosen


def crop_lone_photos(images: list[np.ndarray], size: int, margin: float, detector: FaceDetector,
                     prior: Prior) -> list[tuple[np.ndarray, Choice, dict]]:
    """Lone photos (as the eval set's) cropped in memory exactly as `crop_dataset` crops them into a
    folder: the same detection passes, face choice, geometry, and JPEG encoding (decoded back), so a
    model sees the pixels `predict` gives it. `size`, `margin`: the crop settings (`CropConfig`'s).
    Per photo: (RGB crop, choice, detection)."""
    chunk = [([None], None, [None]) for _ in images]
    units = [[im] for im in images]
    dets = [[{"w": im.shape[1], "h": im.shape[0], "cands": [], "relaxed": False}] for im in images]
    chosen = detect_and_choose(chunk, units, dets, detector, prior)
    out = []
    for im, (c,), (d,) in zip(images, chosen, dets):
        crop = crop_square(im, *square_around(c.box, margin), size)
        out.append((decode_jpeg(encode_jpeg(crop)), c, d))
    return out


def _add_faces(detector: FaceDetector, images, dets, where: list[tuple[int, int]], relaxed: bool) -> None:
    """Run one detector pass on the photos `where` (unit, photo) and add what it finds to their candidates."""
    if not where:
        return
    for (ui, pi), faces in zip(where, detector.detect([images[ui][pi] for ui, pi in where], relaxed=relaxed)):
        d = dets[ui][pi]
        known = [c[:4] for c in d["cands"]]
        for f in faces:
            if relaxed and any(iou(f.box, b) > 0.7 for b in known):
                continue  # the fast pass found this face already
            d["cands"].append([*map(float, f.box), float(f.score), "relaxed" if relaxed else "ok",
                               [float(v) for xy in f.landmarks for v in xy] if f.landmarks else None])
        d["relaxed"] = d["relaxed"] or relaxed


def _candidates(d: dict) -> list[Candidate]:
    return [(tuple(c[:4]), c[4], c[5], c[6]) for c in d["cands"]]


def choose_unit(unit: list, dets: list[dict], prior: Prior) -> list[Choice | None]:
    """The subject's box in each photo of a unit (a person's photos) (None for a photo without pixels)."""
    have = [k for k, d in enumerate(dets) if "error" not in d]
    photos = [(_candidates(dets[k]), dets[k]["w"], dets[k]["h"]) for k in have]
    if len(unit) > 1:
        picked = choose_for_person(photos, prior)
    else:
        picked = [choose_lone(*ph, prior) for ph in photos]
    out: list[Choice | None] = [None] * len(dets)
    for k, c in zip(have, picked):
        out[k] = c
    return out
