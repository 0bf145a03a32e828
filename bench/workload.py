"""The benchmark workload: competition-style 384x512 photos, the subject's face at a known box.

Made from the public-domain faces in tests/assets/faces by tests/synth.py: each synthetic person's
seven photos share framing (shifted, scaled, recoloured, mirrored for half of them), five with a
drawn mask, one with the mask below the nose, one without. A third of the people have a second,
unmasked face partly in frame at one side of most of their photos (a bystander). `truth.json` maps
each photo to the subject's box; `kinds.json` gives its kind (mask, incorrect, normal, lone) and the
bystander's box (or null). `make_lone_workload` writes eval-style lone photos (hashed names, info.csv).
"""
from __future__ import annotations

import atexit
import hashlib
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


KINDS = {"incorrect_mask": "incorrect", "normal": "normal"}  # every other stem is "mask"
BYSTANDER_EVERY = 3  # one person in three has a bystander


def make_workload(out: Path, photos: int = 301, seed: int = 0) -> dict[str, list[float]]:
    """Write ceil(photos / 7) people in the competition train layout under `out`; returns {source: box}
    (kinds.json next to it says each photo's kind and bystander)."""
    out = Path(out)
    truth_file, kinds_file = out / "truth.json", out / "kinds.json"
    if truth_file.is_file() and kinds_file.is_file():
        truth = json.loads(truth_file.read_text())
        if len(truth) >= photos:
            return truth
    rng = np.random.default_rng(seed)
    srcs = sources()
    truth, kinds = {}, {}
    people = -(-photos // 7)
    for p in range(people):
        src = srcs[p % len(srcs)]
        other = srcs[(p + 3) % len(srcs)] if p % BYSTANDER_EVERY == 1 else None
        folder = f"{p + 1:06d}_{'female' if p % 2 else 'male'}_Asian_{20 + (p * 7) % 60}"
        details: dict = {}
        for stem, (img, box) in person_photos(src, rng, flip=bool((p // len(srcs)) % 2), bystander=other,
                                              details=details).items():
            rel = f"images/{folder}/{stem}.jpg"
            save(out / rel, img, quality=90)
            truth[rel] = [float(v) for v in box]
            by = details.get(stem)
            kinds[rel] = {"kind": KINDS.get(stem, "mask"), "bystander": None if by is None else [float(v) for v in by]}
    truth_file.write_text(json.dumps(truth))
    kinds_file.write_text(json.dumps(kinds))
    return truth


def make_lone_workload(out: Path, photos: int = 105, seed: int = 5) -> dict[str, list[float]]:
    """An eval folder of lone photos (hashed names, info.csv; one photo each of new synthetic people,
    mask kinds in the competition's 5:1:1 mix, a bystander in a third of them). Returns {source: box};
    kinds.json as in make_workload, kind "lone"."""
    out = Path(out)
    truth_file, kinds_file = out / "truth.json", out / "kinds.json"
    if truth_file.is_file() and kinds_file.is_file() and len(json.loads(truth_file.read_text())) == photos:
        return json.loads(truth_file.read_text())
    rng = np.random.default_rng(seed)
    srcs = sources()
    truth, kinds, names = {}, {}, []
    stems = ["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]
    for i in range(photos):
        other = srcs[(i + 2) % len(srcs)] if i % BYSTANDER_EVERY == 1 else None
        details: dict = {}
        stem = stems[i % 7]
        img, box = person_photos(srcs[(i * 3) % len(srcs)], rng, flip=bool(rng.integers(2)), bystander=other,
                                 details=details)[stem]
        name = f"{hashlib.sha1(f'lone{seed}/{i}'.encode()).hexdigest()}.jpg"
        save(out / "images" / name, img, quality=90)
        names.append(name)
        truth[f"images/{name}"] = [float(v) for v in box]
        by = details.get(stem)
        kinds[f"images/{name}"] = {"kind": "lone", "mask": KINDS.get(stem, "mask"),
                                   "bystander": None if by is None else [float(v) for v in by]}
    (out / "info.csv").write_text("ImageID,ans\n" + "".join(f"{n},0\n" for n in names))
    truth_file.write_text(json.dumps(truth))
    kinds_file.write_text(json.dumps(kinds))
    return truth



# The labels each source face carries in the visible-class workload: (gender, youngest, oldest, weight).
# Gender is the person's own; the ages are invented within one age group per face, so a model can
# learn gender and age group from the face's identity. The weights make >= 60 rare (20%) and < 30 a
# third, as lopsided as the competition's data.
VISIBLE = {"camera": ("male", 19, 28, 0.30), "obama": ("male", 33, 55, 0.10), "obama2": ("male", 33, 55, 0.10),
           "obama3": ("male", 33, 55, 0.10), "astronaut": ("female", 31, 52, 0.20),
           "biden": ("male", 60, 72, 0.10), "grace_hopper": ("female", 61, 80, 0.10)}


HUMAN = {"obama2": "obama", "obama3": "obama"}  # three photos of one man


def make_visible_workload(out: Path, people: int = 60, seed: int = 0) -> Path:
    """A competition train folder whose classes are visible: mask status drawn on real faces (five
    masks, one below the nose, one bare), gender and age group those of the source face (VISIBLE).
    Returns the raw folder (out/raw)."""
    out = Path(out)
    raw = out / "raw"
    done = out / "visible.json"
    if done.is_file() and json.loads(done.read_text()) == {"people": people, "seed": seed} \
            and (out / "groups.csv").is_file():
        return raw
    shutil.rmtree(raw, ignore_errors=True)
    rng = np.random.default_rng(seed)
    srcs = {s.name: s for s in sources()}
    names = list(VISIBLE)
    weights = np.array([VISIBLE[n][3] for n in names])
    groups = []
    for p in range(people):
        name = names[rng.choice(len(names), p=weights / weights.sum())]
        gender, lo, hi, _ = VISIBLE[name]
        folder = f"{p + 1:06d}_{gender}_Asian_{int(rng.integers(lo, hi + 1))}"
        groups.append((f"{p + 1:06d}", HUMAN.get(name, name)))
        for stem, (img, _) in person_photos(srcs[name], rng, flip=bool(rng.integers(2))).items():
            save(raw / "images" / folder / f"{stem}.jpg", img, quality=90)
    # which human each person is: persons drawn from one face are near-duplicates of each other, so a split
    # that keeps them apart is not out-of-identity (`maskcls train --groups out/groups.csv` keeps them together)
    (out / "groups.csv").write_text("person_id,group\n" + "".join(f"{p},{g}\n" for p, g in groups))
    done.write_text(json.dumps({"people": people, "seed": seed}))
    return raw
