"""The manifest: the only contract between `crop` and `train`/`predict`/`report`.

One row per input photo, in a stable order, with explicit label columns. Nothing downstream
re-derives a label from a folder name.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import labels as L
from .imageio import atomic_write_bytes, atomic_writer, read_crop
from .journal import fingerprint
from .layouts import LayoutError, safe_relative

COLUMNS = ["image_id", "source", "crop", "person_id", "gender", "race", "age", "mask", "age_group", "label",
           "status", "reason", "x1", "y1", "x2", "y2", "score", "width", "height", "faces", "landmarks", "prob", "sha256"]
OPTIONAL = {"faces", "landmarks", "prob", "sha256"}  # absent from manifests written before they existed
# sha256: the photo's content digest (imageio.content_digest), empty where it could not be read
# prob: a pseudo-label's probability (`maskcls pseudo-label`), empty for photos labelled by their names
INT_COLUMNS = {"gender", "age", "mask", "age_group", "label", "width", "height", "faces"}
FLOAT_COLUMNS = {"x1", "y1", "x2", "y2", "score", "prob"}
PACK_WINDOW = 64  # crops decoded ahead of the writer when packing (64 x 196 KB at 256 px)

# The one list of row statuses (the crop stage writes them; report, CLI and datasets read them):
STATUS_HELP = {
    "ok": "the subject's face, found by the detector's first pass",
    "relaxed": "found by the second, lower-threshold pass",
    "person_box": "no face where the person's other photos put it: their box, scaled to this photo",
    "prior_box": "a lone photo with no plausible face: the face prior's box",
    "no_face": "no face found: a centre square (manifests written before the face prior)",
    "unreadable": "no pixels: the file cannot be decoded (a grey crop stands in so predict can still answer)",
    "missing": "no pixels: the file listed is not there (a grey crop stands in)",
    "too_small": "no face possible: the photo is too small or too thin (a grey crop stands in)",
    "bad_name": "the name carries no labels (labels unknown; the face is cropped)",
}
STATUSES = tuple(STATUS_HELP)
TRAINABLE = ("ok", "relaxed", "person_box", "prior_box", "no_face")
FALLBACKS = tuple(s for s in STATUSES if s != "ok")  # rows the report shows in its own gallery
PROBLEMS = ("unreadable", "too_small", "missing", "bad_name")  # rows the CLI lists after cropping
NO_PIXELS = ("unreadable", "too_small", "missing")             # rows whose crop is a grey stand-in
NO_FACE_FOUND = ("person_box", "prior_box", "no_face")         # rows cropped where a face should be, none found

MANIFEST = "manifest.csv"
META = "crops.json"
PACKED = "crops.npy"


def write_manifest(crops: Path, rows: list[dict], meta: dict) -> None:
    """Write manifest.csv and crops.json atomically (each is replaced whole, or not at all); the manifest
    row by row, not built whole in memory first."""
    with atomic_writer(Path(crops) / MANIFEST, text=True) as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    atomic_write_bytes(Path(crops) / META, json.dumps(meta, indent=2).encode("utf-8"))


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return " ".join(map(str, v))
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) > 1.5 else f"{v:.6f}"
    return str(v)


def read_manifest(crops: Path, old: int | None = None) -> list[dict]:
    """Rows of CROPS/manifest.csv with typed values. With `old`, age_group and label are recomputed
    from the explicit `age` column for that threshold (the manifest stores them for the crop's `old`)."""
    path = Path(crops) / MANIFEST
    if not path.is_file():
        crops = Path(crops)
        raw_like = any((crops / n).exists() for n in ("images", "info.csv", "labels.csv", "train.csv", "train"))
        if not raw_like and crops.is_dir() and _holds_person_folders(crops):
            raise LayoutError(f"{crops} holds raw photos (person folders), not crops: crop them first with "
                              f"`maskcls crop {crops} --out CROPS` and give CROPS")
        if raw_like:
            raise LayoutError(f"{crops} holds raw photos, not crops (it has no {MANIFEST}): crop them first with "
                              f"`maskcls crop {crops} --out CROPS` and give CROPS")
        raise LayoutError(f"{crops} has no {MANIFEST}: is it a crops folder? Make one with `maskcls crop RAW --out {crops}`")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - OPTIONAL - set(reader.fieldnames or [])
        if missing:
            raise LayoutError(f"{path} is not a maskcls manifest: missing columns {sorted(missing)}")
        rows = []
        for n, raw in enumerate(reader, start=2):
            r = dict(raw)
            try:
                for k in OPTIONAL:
                    r.setdefault(k, "")
                for k in INT_COLUMNS:
                    r[k] = int(r[k]) if r[k] != "" else L.UNKNOWN
                for k in FLOAT_COLUMNS:
                    r[k] = float(r[k]) if r[k] != "" else None
                r["landmarks"] = [float(v) for v in r["landmarks"].split()] or None
            except ValueError as e:
                raise LayoutError(f"{path} line {n}: {e}") from None
            r["crop"] = safe_relative(Path(crops), r["crop"], f"{path} line {n}")
            if old is not None:
                r["age_group"] = L.age_group(r["age"], old)
                r["label"] = L.encode(r["mask"], r["gender"], r["age_group"])
            rows.append(r)
    return rows


def _holds_person_folders(folder: Path) -> bool:
    """Whether `folder` holds folders of photos (the competition's person folders, or any folder of
    .jpg/.jpeg/.png files): raw photos, not a crops folder."""
    from .layouts import IMAGE_EXTS

    for d in folder.iterdir():
        if d.is_dir() and not d.name.startswith(".") and any(f.suffix.lower() in IMAGE_EXTS for f in d.iterdir()):
            return True
    return False


def read_meta(crops: Path) -> dict:
    path = Path(crops) / META
    return json.loads(path.read_text()) if path.is_file() else {}


def manifest_digest(crops: Path) -> str:
    return hashlib.sha256((Path(crops) / MANIFEST).read_bytes()).hexdigest()


def packed_crops(crops: Path) -> Path | None:
    """crops.npy if it was packed from the current manifest and crop files, else None (callers then
    decode the JPEGs). A crop edited after packing (its size or mtime changed) voids the pack: the
    torch backend reads the pack, the ONNX backend the JPEGs, and both must see the same pixels."""
    target, stamp_file = Path(crops) / PACKED, Path(crops) / (PACKED + ".json")
    if not (target.is_file() and stamp_file.is_file()):
        return None
    try:
        info = json.loads(stamp_file.read_text())
        if info.get("manifest_sha256") != manifest_digest(crops):
            return None
        with open(Path(crops) / MANIFEST, newline="") as f:
            names = [r["crop"] for r in csv.DictReader(f)]
        ok = info.get("stamp") == _crop_stamp(Path(crops), names)
    except (OSError, ValueError, KeyError):
        return None
    return target if ok else None


def _crop_stamp(out: Path, names: list[str]) -> str:
    """The crop files as packed: each one's name, size and mtime."""
    return hashlib.sha256(json.dumps([(n, fingerprint(out / n)) for n in names]).encode()).hexdigest()


def pack_crops(out: Path, rows: list[dict], size: int, workers: int = 2) -> Path:
    """Write crops.npy (N x size x size x 3 uint8, manifest order), decoded from the JPEG crops, atomically.

    Its stamp (crops.npy.json) records the manifest's hash; readers trust the pack only if it matches.
    Skipped when an up-to-date pack exists (same manifest, same crop files, sizes and mtimes). `workers`
    threads decode (OpenCV releases the GIL), a window of `PACK_WINDOW` crops at a time, so the memory held
    stays the same at any data set size; the file is written in order by this thread."""
    stamp = _crop_stamp(out, [r["crop"] for r in rows])
    target, stamp_file = out / PACKED, out / (PACKED + ".json")
    info = {"stamp": stamp, "manifest_sha256": manifest_digest(out), "rows": len(rows), "size": size}
    if target.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text()) == info:
        return target
    tmp = out / f".{PACKED}.tmp.npy"
    # Plain sequential writes, not a writable memory map: mapped dirty pages count as the process's
    # memory, so a map would grow with the data set.
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|u1", "fortran_order": False, "shape": (len(rows), size, size, 3)})
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for start in range(0, len(rows), PACK_WINDOW):
                window = rows[start:start + PACK_WINDOW]
                for r, crop in zip(window, pool.map(lambda r: read_crop(out / r["crop"]), window)):
                    if crop.shape != (size, size, 3):
                        raise ValueError(f"{r['crop']} is {crop.shape}, expected {(size, size, 3)}: recrop this folder")
                    f.write(np.ascontiguousarray(crop).tobytes())
    stamp_file.unlink(missing_ok=True)  # no window where an old stamp vouches for a new array
    os.replace(tmp, target)
    atomic_write_bytes(stamp_file, json.dumps(info).encode())
    return target
