"""The crop stage: raw photos → square face crops + manifest.csv (+ a packed uint8 array for training).

For every photo (see `layouts.discover` for what is read), in order:

1. decode (EXIF-upright RGB) in worker threads, overlapping detection;
2. detect with the fast settings (`ok`); a photo with no face gets a second pass with relaxed
   thresholds and a finer pyramid (`relaxed`); then the median box of the same person's photos
   that were found, scaled to this photo (`person_box`: one person's seven photos share their
   framing); only then a centred square (`no_face`);
3. crop a square around the box with `margin` of the box side added on each side (hair and neck
   carry age and gender cues), padded by edge replication where it leaves the photo, resized to `size`;
4. write the crop as JPEG (quality 95) atomically.

An unreadable or missing photo gets a grey crop and its reason, so every row can still be predicted.

Caching: each finished person (unit) is appended to `CROPS/.journal.jsonl` with the settings key
and the source files' size and mtime. A rerun with the same settings reuses every unit whose files
are unchanged and whose crops exist, and runs no detection for it; other settings recrop. A killed
run resumes from the journal. The manifest is written atomically at the end.

Finally the crops are packed, in manifest order, into `crops.npy` (N x size x size x 3 uint8) that
training memory-maps: reading a crop is then a memory copy, not a JPEG decode (see BENCHMARKS.md).
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np

from . import labels as L
from .detector import Face, FaceDetector, detect_two_pass
from .imageio import UnreadableImage, atomic_write_bytes, encode_jpeg, load_rgb, read_crop
from .layouts import LayoutError, Photo, discover
from .manifest import write_manifest
from .runtime import OptionError, check_device

CROP_VERSION = 1  # bump when the crop geometry or encoding changes: it invalidates every cache
JOURNAL = ".journal.jsonl"
PACKED = "crops.npy"
GREY = 128


@dataclass(frozen=True)
class CropConfig:
    size: int = 256            # side of the saved square crop, pixels
    margin: float = 0.3        # fraction of the face box side added on each side
    device: str = "auto"
    batch_size: int = 32       # photos per detector call (equal sizes are batched together)
    detect_side: int = 256     # detection runs on a copy whose longer side is this (0: full size)
    min_face: float = 0.3      # smallest face searched, as a fraction of the photo's shorter side
    workers: int = 2           # threads decoding photos and encoding crops
    old: int = L.DEFAULT_OLD   # age-group threshold for the manifest's age_group/label columns
    pack: bool = True          # write crops.npy for fast training loads
    strict: bool = False       # stop before any work if a photo has a bad name or is missing

    def check(self) -> None:
        """Refuse, before any work, a value that cannot work (naming the option and what it accepts)."""
        check_device(self.device)
        ranges = [("size", 32 <= self.size <= 4096, "in 32..4096"),
                  ("margin", 0 <= self.margin <= 2, "in 0..2 (a fraction of the face box's side)"),
                  ("batch-size", self.batch_size >= 1, ">= 1"),
                  ("detect-side", self.detect_side == 0 or 48 <= self.detect_side <= 8192, "0 (full size) or 48..8192"),
                  ("min-face", 0 < self.min_face <= 1, "in (0, 1] (a fraction of the photo's shorter side)"),
                  ("workers", self.workers >= 1, ">= 1"),
                  ("old", L.YOUNG < self.old <= 120, f"in {L.YOUNG + 1}..120")]
        for name, ok, allowed in ranges:
            if not ok:
                raise OptionError(f"--{name} {getattr(self, name.replace('-', '_'))}: must be {allowed}")


@dataclass
class CropResult:
    crops: Path
    layout: str
    rows: list[dict]
    counts: dict[str, int]
    detected: int              # photos cropped in this run, all ranks together (0: everything came from the cache)
    warnings: list[str] = field(default_factory=list)


def crop_dataset(raw: Path, out: Path, config: CropConfig = CropConfig(), detector: FaceDetector | None = None,
                 on_progress: Callable[[int, int], None] | None = None, rank: int = 0, world: int = 1,
                 barrier: Callable[[], None] | None = None) -> CropResult:
    """Crop every photo of `raw` into `out` and write `out/manifest.csv`.

    >>> res = crop_dataset(Path("data_samples/train"), Path("/tmp/crops"))
    >>> res.counts   # {'ok': 54, 'relaxed': 1, 'person_box': 1, 'no_face': 0, ...}

    `on_progress(done, total)` is called as photos finish. Under torchrun (`world` > 1) each rank
    crops its share of the persons and rank 0 writes the one manifest (same rows, same order) and
    returns the whole result; the other ranks return their share (no counts).
    """
    config.check()
    raw, out = Path(raw).resolve(), Path(out).resolve()
    found = discover(raw)
    if config.strict:
        bad = [f"{p.source}: {p.reason}" for p in found.photos if p.status]
        if bad or found.warnings:
            raise LayoutError(f"--strict: {len(bad)} photo(s) and {len(found.warnings)} layout warning(s): "
                              + "; ".join(bad[:20] + found.warnings[:20]))
    out.mkdir(parents=True, exist_ok=True)
    if detector is None:
        from .detector import MTCNNDetector
        detector = MTCNNDetector(device=config.device, detect_side=config.detect_side, min_face=config.min_face,
                                 batch_size=config.batch_size)
    key = settings_key(config, detector)
    paths = crop_paths(found.photos)
    units = _units(found.photos)
    cache = _read_journal(out, key)
    if cache and rank == 0:
        _remove_stale_temp_files(out)  # a killed run may have left half-written '.<name>.tmp' files
    if world > 1:
        barrier()  # no rank writes before rank 0 has cleaned up
    todo, done_rows, unit_fps = [], {}, []
    for u in units:
        fps = [_fingerprint(raw / p.source) for p in u]  # taken once: the journal records what was read
        unit_fps.append(fps)
        hit = cache.get(tuple(p.source for p in u))
        if hit and hit["fps"] == fps and all((out / r["crop"]).is_file() for r in hit["rows"]):
            done_rows.update({r["source"]: r for r in hit["rows"]})
        else:
            todo.append((u, fps))
    mine = todo[rank::world]
    total = sum(len(u) for u, _ in mine)
    detected = sum(len(u) for u, _ in todo)
    journal_path = out / (JOURNAL if world == 1 else f".journal.rank{rank}.jsonl")
    with ThreadPoolExecutor(max(1, config.workers)) as pool, open(journal_path, "a", encoding="utf-8") as journal:
        finished = 0
        for chunk, images in _prefetch(pool, raw, _chunks(mine, config.batch_size)):
            rows = _crop_chunk(pool, out, paths, chunk, images, config, detector)
            for (u, fps), urows in zip(chunk, rows):
                journal.write(json.dumps({"key": key, "sources": [p.source for p in u], "fps": fps, "rows": urows}) + "\n")
                done_rows.update({r["source"]: r for r in urows})
            journal.flush()
            os.fsync(journal.fileno())
            finished += sum(len(u) for u, _ in chunk)
            if on_progress:
                on_progress(finished, total)
    if world > 1:
        barrier()  # every rank's journal is complete
        if rank != 0:  # rank 0 alone merges the journals and writes; the others return their share
            rows = [done_rows[p.source] for p in found.photos if p.source in done_rows]
            return CropResult(out, found.layout, rows, {}, detected, found.warnings)
        for r in _read_journal(out, key).values():
            done_rows.update({row["source"]: row for row in r["rows"]})
    rows = [done_rows[p.source] for p in found.photos]
    counts = {s: 0 for s in ("ok", "relaxed", "person_box", "no_face", "unreadable", "missing", "bad_name")}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    meta = {"version": CROP_VERSION, "key": key, "layout": found.layout, "raw": str(raw),
            "config": asdict(config), "detector": detector.settings, "engine": getattr(detector, "engine", None),
            "counts": counts, "rows": len(rows)}
    write_manifest(out, rows, meta)
    _compact_journal(out, key, units, unit_fps, rows)
    if config.pack:
        pack_crops(out, rows, config.size)
    # No collective after rank 0's writes: the other ranks need nothing more (they wait for rank 0 in
    # Dist.close(), on the rendezvous store).
    return CropResult(out, found.layout, rows, counts, detected, found.warnings)


def settings_key(config: CropConfig, detector: FaceDetector) -> str:
    """Hash of everything that changes a crop's pixels or box (not workers, device or batch size)."""
    relevant = {"v": CROP_VERSION, "size": config.size, "margin": config.margin, "old": config.old,
                "detector": detector.settings}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


# -- geometry -------------------------------------------------------------------------------------

def square_around(box: Iterable[float], margin: float) -> tuple[float, float, float]:
    """(cx, cy, side) of the square crop around a face box, `margin` x box side added on each side."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    return (x1 + x2) / 2, (y1 + y2) / 2, max(side, 8.0)


def crop_square(img: np.ndarray, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Cut the square (cx, cy, side) out of `img`, replicating edges outside it, and resize to size x size."""
    h, w = img.shape[:2]
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = int(round(side))
    x1, y1 = x0 + s, y0 + s
    pad = max(0, -x0, -y0, x1 - w, y1 - h)
    if pad:
        img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        x0, y0, x1, y1 = x0 + pad, y0 + pad, x1 + pad, y1 + pad
    patch = img[y0:y1, x0:x1]
    interp = cv2.INTER_AREA if s > size else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interp)


def centre_box(w: int, h: int) -> tuple[float, float, float, float]:
    """The no-face fallback: a centred square half as wide as the photo's shorter side."""
    s = 0.5 * min(w, h)
    return (w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2


# -- the pipeline -----------------------------------------------------------------------------------

def _units(photos: list[Photo]) -> list[list[Photo]]:
    """Groups whose photos share framing (a person's folder); a photo without a person is its own unit."""
    units: dict[str, list[Photo]] = {}
    for p in photos:
        k = p.person_id and f"{p.person_id}\0{p.source.rsplit('/', 1)[0]}"
        units.setdefault(k or f"\1{p.source}", []).append(p)
    return list(units.values())


def _chunks(units, photos_per_chunk: int):
    chunk, n = [], 0
    for u in units:
        chunk.append(u)
        n += len(u[0])
        if n >= photos_per_chunk:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def _load(raw: Path, p: Photo):
    if p.status == "missing":
        return UnreadableImage(p.reason)
    try:
        return load_rgb(raw / p.source)
    except UnreadableImage as e:
        return e


def _prefetch(pool, raw: Path, chunks):
    """Yield (chunk, images) with the next chunk's photos already decoding in the pool."""
    def submit(chunk):
        return [[pool.submit(_load, raw, p) for p in u] for u, _ in chunk]
    it = iter(chunks)
    cur = next(it, None)
    futs = submit(cur) if cur else None
    while cur is not None:
        nxt = next(it, None)
        nfuts = submit(nxt) if nxt else None
        yield cur, [[f.result() for f in uf] for uf in futs]
        cur, futs = nxt, nfuts


def _crop_chunk(pool, out: Path, paths: dict[str, str], chunk, images, config: CropConfig, detector: FaceDetector):
    flat = [(ui, pi) for ui, u in enumerate(images) for pi, im in enumerate(u) if isinstance(im, np.ndarray)]
    found = detect_two_pass(detector, [images[ui][pi] for ui, pi in flat])
    faces: dict[tuple[int, int], tuple[Face, str]] = {k: hit for k, hit in zip(flat, found) if hit is not None}
    jobs = []
    for ui, ((unit, _), imgs) in enumerate(zip(chunk, images)):
        rel = [_relative(f.box, imgs[pi].shape) for (u2, pi), (f, _) in faces.items() if u2 == ui]
        person = np.median(np.array(rel), axis=0) if rel else None
        for pi, (p, img) in enumerate(zip(unit, imgs)):
            jobs.append((p, img, faces.get((ui, pi)), person))
    rows = list(pool.map(lambda j: _crop_one(out, paths[j[0].source], config, *j), jobs))
    by_unit, k = [], 0
    for unit, _ in chunk:
        by_unit.append(rows[k:k + len(unit)])
        k += len(unit)
    return by_unit


def _relative(box, shape) -> np.ndarray:
    h, w = shape[:2]
    return np.array([box[0] / w, box[1] / h, box[2] / w, box[3] / h])


def _crop_one(out: Path, crop_rel: str, config: CropConfig, p: Photo, img, hit, person) -> dict:
    age_group = L.age_group(p.age, config.old)
    row = {"image_id": p.image_id, "source": p.source, "crop": crop_rel, "person_id": p.person_id,
           "gender": p.gender, "race": p.race, "age": p.age, "mask": p.mask, "age_group": age_group,
           "label": L.encode(p.mask, p.gender, age_group), "status": p.status, "reason": p.reason,
           "x1": None, "y1": None, "x2": None, "y2": None, "score": None, "width": None, "height": None}
    if p.status == "bad_name":
        row["label"] = L.UNKNOWN
    if not isinstance(img, np.ndarray):
        row["status"] = p.status or "unreadable"
        row["reason"] = str(img)
        crop = np.full((config.size, config.size, 3), GREY, np.uint8)
    else:
        h, w = img.shape[:2]
        if hit is not None:
            box, score, status = hit[0].box, hit[0].score, hit[1]
        elif person is not None:
            box = (person[0] * w, person[1] * h, person[2] * w, person[3] * h)
            score, status = None, "person_box"
        else:
            box, score, status = centre_box(w, h), None, "no_face"
        row.update(x1=box[0], y1=box[1], x2=box[2], y2=box[3], score=score, width=w, height=h)
        row["status"] = p.status or status
        if p.status == "bad_name":
            row["reason"] = f"{p.reason}; face: {status}"
        crop = crop_square(img, *square_around(box, config.margin), config.size)
    atomic_write_bytes(out / row["crop"], encode_jpeg(crop))
    return row


def crop_paths(photos: list[Photo]) -> dict[str, str]:
    """Where each photo's crop lives under CROPS: crops/<source without extension>.jpg, or, where two
    sources differ only by extension (a.jpg, a.png), crops/<source>.jpg for those."""
    def short(src: str) -> str:
        stem, dot, _ = src.rpartition(".")
        return f"crops/{stem if dot and '/' not in src[len(stem):] else src}.jpg"
    counts: dict[str, int] = {}
    for p in photos:
        counts[short(p.source)] = counts.get(short(p.source), 0) + 1
    return {p.source: short(p.source) if counts[short(p.source)] == 1 else f"crops/{p.source}.jpg" for p in photos}


def _fingerprint(path: Path) -> list[int]:
    try:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, -1]


def _read_journal(out: Path, key: str) -> dict[tuple[str, ...], dict]:
    """Finished units of earlier (possibly killed) runs with these settings; a torn last line is ignored."""
    units = {}
    for path in sorted(out.glob(".journal*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a kill cut short
                if rec.get("key") == key:
                    units[tuple(rec["sources"])] = rec
    return units


def _remove_stale_temp_files(out: Path) -> None:
    for p in out.rglob(".*.tmp*"):
        if p.is_file():
            p.unlink(missing_ok=True)


def _compact_journal(out: Path, key: str, units, unit_fps, rows) -> None:
    """Rewrite the journal to hold exactly this run's units (the cache for the next run)."""
    by_source = {r["source"]: r for r in rows}
    lines = [json.dumps({"key": key, "sources": [p.source for p in u], "fps": fps,
                         "rows": [by_source[p.source] for p in u]}) for u, fps in zip(units, unit_fps)]
    atomic_write_bytes(out / JOURNAL, ("\n".join(lines) + "\n").encode("utf-8"))
    for extra in out.glob(".journal.rank*.jsonl"):
        extra.unlink(missing_ok=True)


def pack_crops(out: Path, rows: list[dict], size: int) -> Path:
    """Write crops.npy (N x size x size x 3 uint8, manifest order), decoded from the JPEG crops, atomically.

    Its stamp (crops.npy.json) records the manifest's hash; readers trust the pack only if it matches.
    Skipped when an up-to-date pack exists (same manifest, same crop files, sizes and mtimes)."""
    stamp = hashlib.sha256(json.dumps([(r["crop"], _fingerprint(out / r["crop"])) for r in rows]).encode()).hexdigest()
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
        for r in rows:
            crop = read_crop(out / r["crop"])
            if crop.shape != (size, size, 3):
                raise ValueError(f"{r['crop']} is {crop.shape}, expected {(size, size, 3)}: recrop this folder")
            f.write(np.ascontiguousarray(crop).tobytes())
    stamp_file.unlink(missing_ok=True)  # no window where an old stamp vouches for a new array
    os.replace(tmp, target)
    atomic_write_bytes(stamp_file, json.dumps(info).encode())
    return target


def manifest_digest(out: Path) -> str:
    return hashlib.sha256((Path(out) / "manifest.csv").read_bytes()).hexdigest()


def packed_crops(out: Path) -> Path | None:
    """crops.npy if it was packed from the current manifest, else None (callers then decode the JPEGs)."""
    target, stamp_file = Path(out) / PACKED, Path(out) / (PACKED + ".json")
    if not (target.is_file() and stamp_file.is_file()):
        return None
    try:
        ok = json.loads(stamp_file.read_text()).get("manifest_sha256") == manifest_digest(out)
    except (OSError, ValueError):
        return None
    return target if ok else None
