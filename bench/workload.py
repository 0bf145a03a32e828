"""The benchmark workload: competition-style 384x512 photos, one face each at a known box.

Made from the public-domain faces in tests/assets/faces by tests/synth.py: each synthetic person's
seven photos share framing (shifted, scaled, recoloured, mirrored for half of them), five with a
drawn mask, one with the mask below the nose, one without. `truth.json` maps each photo to its box.
"""
from __future__ import annotations

import atexit
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.synth import iou, person_photos, save, sources  # noqa: E402,F401 (iou: for the benchmarks)


def workdir(path: Path | None) -> Path:
    """The benchmark's work folder: `path` when given (kept: later runs reuse its workload), else a
    temporary folder removed when the process exits."""
    if path is not None:
        return path
    tmp = Path(tempfile.mkdtemp(prefix="maskcls-bench-"))
    atexit.register(shutil.rmtree, tmp, True)
    return tmp


def make_workload(out: Path, photos: int = 301, seed: int = 0) -> dict[str, list[float]]:
    """Write ceil(photos / 7) people in the competition train layout under `out`; returns {source: box}."""
    out = Path(out)
    truth_file = out / "truth.json"
    if truth_file.is_file():
        truth = json.loads(truth_file.read_text())
        if len(truth) >= photos:
            return truth
    rng = np.random.default_rng(seed)
    srcs = sources()
    truth = {}
    people = -(-photos // 7)
    for p in range(people):
        src = srcs[p % len(srcs)]
        folder = f"{p + 1:06d}_{'female' if p % 2 else 'male'}_Asian_{20 + (p * 7) % 60}"
        for stem, (img, box) in person_photos(src, rng, flip=bool((p // len(srcs)) % 2)).items():
            rel = f"images/{folder}/{stem}.jpg"
            save(out / rel, img, quality=90)
            truth[rel] = [float(v) for v in box]
    truth_file.write_text(json.dumps(truth))
    return truth



# The labels each source face carries in the visible-class workload: (gender, youngest, oldest, weight).
# Gender is the person's own; the ages are invented within one age group per face, so a model can
# learn gender and age group from the face's identity. The weights make >= 60 rare (20%) and < 30 a
# third, as lopsided as the competition's data.
VISIBLE = {"camera": ("male", 19, 28, 0.30), "obama": ("male", 33, 55, 0.10), "obama2": ("male", 33, 55, 0.10),
           "obama3": ("male", 33, 55, 0.10), "astronaut": ("female", 31, 52, 0.20),
           "biden": ("male", 60, 72, 0.10), "grace_hopper": ("female", 61, 80, 0.10)}


def make_visible_workload(out: Path, people: int = 60, seed: int = 0) -> Path:
    """A competition train folder whose classes are visible: mask status drawn on real faces (five
    masks, one below the nose, one bare), gender and age group those of the source face (VISIBLE).
    Returns the raw folder (out/raw)."""
    out = Path(out)
    raw = out / "raw"
    done = out / "visible.json"
    if done.is_file() and json.loads(done.read_text()) == {"people": people, "seed": seed}:
        return raw
    shutil.rmtree(raw, ignore_errors=True)
    rng = np.random.default_rng(seed)
    srcs = {s.name: s for s in sources()}
    names = list(VISIBLE)
    weights = np.array([VISIBLE[n][3] for n in names])
    for p in range(people):
        name = names[rng.choice(len(names), p=weights / weights.sum())]
        gender, lo, hi, _ = VISIBLE[name]
        folder = f"{p + 1:06d}_{gender}_Asian_{int(rng.integers(lo, hi + 1))}"
        for stem, (img, _) in person_photos(srcs[name], rng, flip=bool(rng.integers(2))).items():
            save(raw / "images" / folder / f"{stem}.jpg", img, quality=90)
    done.write_text(json.dumps({"people": people, "seed": seed}))
    return raw
