"""Datasets over the manifest, label fixes, and person-level splits.

Labels come only from the manifest's explicit columns. Splits are made over *people*, never photos:
a person's seven photos share a face, and a split that shares people between train and validation
measures memory, not generalisation.
"""
from __future__ import annotations

import csv
import hashlib
import random
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from preprocess import labels as L
from preprocess.imageio import read_crop
from preprocess.manifest import TRAINABLE, packed_crops, read_manifest

from .errors import ConfigError
from .masks import synthesize

LABEL_FIELDS = {"gender", "age", "mask"}


def load_rows(crops: Path, old: int = L.DEFAULT_OLD, label_fixes: Path | None = None,
              statuses: tuple[str, ...] = TRAINABLE) -> tuple[list[dict], list[dict]]:
    """(all manifest rows, the rows to train/validate on). Each row keeps its manifest position in 'index'.

    Trainable: status in `statuses` (by default `manifest.TRAINABLE`: the fallbacks' crops still show
    the person, and dropping them would drop mostly masked faces, the ones MTCNN misses) and a known label.
    """
    rows = read_manifest(crops, old=old)
    for i, r in enumerate(rows):
        r["index"] = i
    if label_fixes:
        apply_label_fixes(rows, Path(label_fixes), old)
    usable = [r for r in rows if r["status"] in statuses and r["label"] >= 0]
    return rows, usable


def apply_label_fixes(rows: list[dict], path: Path, old: int) -> int:
    """Apply `image_id,field,value` corrections (field: gender, age, mask) in place; returns how many.

    A gender fix applies to the named photo; to fix a whole person, list each photo (or use
    `image_id` = the person folder name, e.g. `006359_female_Asian_18`, which matches all its photos).
    Unknown ids or fields are an error listing every one, not a silent no-op."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        fixes = list(csv.DictReader(f))
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(r["image_id"], []).append(r)
        if "/" in r["image_id"]:  # also reachable by its person folder (an eval id has none)
            by_id.setdefault(r["image_id"].split("/")[0], []).append(r)
    bad, n = [], 0
    for k, fx in enumerate(fixes, start=2):
        iid, field, value = (fx.get("image_id") or "").strip(), (fx.get("field") or "").strip(), (fx.get("value") or "").strip()
        targets = by_id.get(iid)
        if not targets or field not in LABEL_FIELDS:
            bad.append(f"line {k}: {iid!r} {field!r}")
            continue
        try:
            v = L.GENDERS[value] if field == "gender" and value in L.GENDERS else int(value)
        except ValueError:
            bad.append(f"line {k}: value {value!r}")
            continue
        for r in targets:
            r[field] = v
            r["age_group"] = L.age_group(r["age"], old)
            r["label"] = L.encode(r["mask"], r["gender"], r["age_group"])
            n += 1
    if bad:
        raise ConfigError(f"--label-fixes {path}: {len(bad)} fix(es) name no photo or field "
                          f"(fields: {', '.join(sorted(LABEL_FIELDS))}): " + "; ".join(bad[:20]))
    return n


def person_key(r: dict) -> str:
    """The unit of a split: the person id, or the photo itself when the data set has no person ids."""
    return r["person_id"] or f"photo:{r['image_id']}"


def split_persons(rows: list[dict], seed: int = 42, val_ratio: float = 0.2, folds: int = 0, fold: int = 0) -> dict[str, str]:
    """{person: 'train' | 'val'}, stratified on gender x age group, reproducible from the seed.

    With `folds` = K > 1, people are dealt round-robin into K folds within each stratum and fold
    `fold` is the validation set, so the K validation sets partition the people."""
    strata: dict[tuple[int, int], list[str]] = {}
    seen = set()
    for r in rows:
        p = person_key(r)
        if p not in seen:
            seen.add(p)
            strata.setdefault((r["gender"], r["age_group"]), []).append(p)
    rng = random.Random(seed)
    out = {}
    if folds and folds > 1:
        if not 0 <= fold < folds:
            raise ConfigError(f"--fold must be in 0..{folds - 1}, got {fold}")
        offset = 0
        for key in sorted(strata):
            people = sorted(strata[key])
            rng.shuffle(people)
            for i, p in enumerate(people):
                out[p] = "val" if (i + offset) % folds == fold else "train"
            offset += len(people)  # rotate so small strata do not all land in fold 0
        return out
    if not 0 < val_ratio < 1:
        raise ConfigError(f"--val-ratio must be between 0 and 1, got {val_ratio}")
    carry = 0.0
    for key in sorted(strata):
        people = sorted(strata[key])
        rng.shuffle(people)
        exact = len(people) * val_ratio + carry
        n_val = int(exact + 0.5)
        carry = exact - n_val  # rounding error passed on, so tiny strata add up to the right total
        for i, p in enumerate(people):
            out[p] = "val" if i < n_val else "train"
    return out


def write_split(path: Path, split: dict[str, str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["person_id", "split"])
        for p in sorted(split):
            w.writerow([p, split[p]])


class CropDataset(Dataset):
    """Face crops of the given manifest rows, with their 18-class label.

    Reads `crops.npy` (memory-mapped, written by the crop stage) when it matches the manifest, else
    decodes the JPEG crops. Augmentation randomness is drawn per sample from (seed, epoch, index),
    so a batch is the same whatever the number of workers or processes, and after a resume.
    Items: (3 x H x W uint8 tensor, label, manifest index); `transforms.normalize` turns a batch
    into the model's input.
    """

    def __init__(self, crops: Path, rows: list[dict], transform, seed: int = 0, synth_mask: float = 0.0):
        self.crops, self.rows, self.transform, self.seed = Path(crops), rows, transform, seed
        self.synth_mask = synth_mask  # training only: the chance that an unmasked crop gets a drawn mask
        self.epoch = 0
        self.labels = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        self._packed_path = packed_crops(self.crops)
        self._packed = None

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def image(self, i: int) -> np.ndarray:
        r = self.rows[i]
        if r.get("root") is not None:  # a row of another crops folder (train --extra)
            return read_crop(Path(r["root"]) / r["crop"])
        if self._packed_path is not None:
            if self._packed is None:  # opened lazily: each DataLoader worker maps it itself
                self._packed = np.load(self._packed_path, mmap_mode="r")
            return np.array(self._packed[r["index"]])
        return read_crop(self.crops / r["crop"])

    def __getitem__(self, key):
        """`key`: an index (augmented for `self.epoch`), or (index, epoch) from an `engine.EpochOrder`."""
        i, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        s = _sample_seed(self.seed, epoch, self.rows[i]["index"])
        img, label = self.image(i), self.labels[i]
        if self.synth_mask and self.rows[i]["mask"] == 2 and self.rows[i].get("landmarks"):
            rng = np.random.default_rng([s, 1])
            if rng.random() < self.synth_mask:
                img, new = synthesize(img, self.rows[i]["landmarks"], int(label), rng)
                label = torch.tensor(new)
        self.transform.set_random_state(np.random.default_rng(s), random.Random(s))
        x = torch.from_numpy(channels_first(self.transform(image=img)["image"]))
        return x, label, self.rows[i]["index"]


def channels_first(img: np.ndarray) -> np.ndarray:
    """H x W x 3 → a contiguous 3 x H x W copy. cv2.split into the planes of one array: 8 µs for
    224 x 224 against 43 µs for numpy's strided transpose copy (measured), a fifth of a loader item."""
    out = np.empty((img.shape[2], *img.shape[:2]), img.dtype)
    cv2.split(np.ascontiguousarray(img), list(out))
    return out


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest(), "little")


