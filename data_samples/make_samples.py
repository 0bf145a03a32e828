"""Regenerate data_samples/ from the public-domain faces in tests/assets/faces.

    python data_samples/make_samples.py

train/: 8 synthetic people x 7 photos in the competition layout (masks drawn from landmarks, mixed
.jpg/.jpeg/.png, a '-1' id, ids chosen so that '000010' sorts before '000002' would by number), plus
train.csv. eval/: 14 photos with hashed names and info.csv. The people's gender and age are
invented labels for exercising the pipeline (the photos are of a few real people; see SOURCES.md).
"""
from __future__ import annotations

import csv
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
from tests.synth import person_photos, save, sources  # noqa: E402

PEOPLE = [  # (source face, flip, folder name, extension)
    ("astronaut", False, "000001_female_Asian_45", ".jpg"),
    ("grace_hopper", False, "000002_female_Asian_76", ".jpg"),
    ("biden", False, "000003_male_Asian_67", ".jpeg"),
    ("obama", False, "000004_male_Asian_52", ".jpg"),
    ("obama2", False, "000600-1_male_Asian_25", ".jpg"),
    ("obama3", False, "000010_male_Asian_29", ".jpg"),
    ("astronaut", True, "000020_female_Asian_22", ".jpg"),
    ("camera", False, "000031_male_Asian_61", ".png"),
]


def main() -> None:
    rng = np.random.default_rng(20261129)
    src = {s.name: s for s in sources()}
    for d in ("train", "eval"):
        shutil.rmtree(ROOT / d, ignore_errors=True)
    rows, eval_names = [], []
    for face, flip, folder, ext in PEOPLE:
        photos = person_photos(src[face], rng, flip=flip)
        pid, gender, race, age = folder.split("_")
        rows.append({"id": pid, "gender": gender, "race": race, "age": age, "path": folder})
        for stem, (img, _) in photos.items():
            e = ".png" if (ext == ".png" and stem in ("normal", "incorrect_mask")) else (".jpg" if ext == ".png" else ext)
            save(ROOT / "train" / "images" / folder / f"{stem}{e}", img, quality=80)
        # Two more photos of each person, re-framed, for the eval set.
        more = person_photos(src[face], rng, flip=not flip)
        for stem in ("mask2", "normal"):
            name = hashlib.sha1(f"{folder}/{stem}".encode()).hexdigest() + ".jpg"
            save(ROOT / "eval" / "images" / name, more[stem][0], quality=80)
            eval_names.append(name)
    with open(ROOT / "train" / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "gender", "race", "age", "path"])
        w.writeheader()
        w.writerows(rows)
    with open(ROOT / "eval" / "info.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageID", "ans"])
        w.writerows([n, 0] for n in eval_names)


if __name__ == "__main__":
    main()
