"""The crop stage: raw photos → square face crops + manifest.csv (+ a packed uint8 array for training).

For every photo (see `layouts.discover` for what is read), in order:

1. decode (EXIF-upright RGB) in worker threads, overlapping detection;
2. detect every face with the fast settings; choose the subject among them (`faces.py`, `subject.py`): within a
   person, the face in the place the person's other photos agree on; for a lone photo, the face the
   prior finds likeliest. A photo whose subject was not found gets a second pass with relaxed
   thresholds and a finer pyramid (`relaxed`); then the person's box, scaled to this photo
   (`person_box`: one person's seven photos share their framing), whatever else the photo shows; a
   lone photo gets the prior's box (`prior_box`);
3. crop a square around the box with `margin` of the box side added on each side (hair and neck
   carry age and gender cues), padded by edge replication where it leaves the photo, resized to `size`;
4. write the crop as JPEG (quality 95) atomically.

An unreadable or missing photo gets a grey crop and its reason, so every row can still be predicted.

Caching: each finished person (unit) is appended to `CROPS/.journal.jsonl` with the settings key,
the source files' size and mtime, what detection found (every candidate of both passes) and the box
each crop was cut from. Nothing else is cached: labels, person ids and the subject choice are rebuilt
on every run from the raw folder, so an edited labels.csv is followed without detection work, and a
crop is re-cut (not re-detected) when a new prior chooses another face. A killed run resumes from the
journal. The manifest is written atomically at the end, with crops.json (settings, counts, the face
prior this folder teaches).

Finally the crops are packed, in manifest order, into `crops.npy` (N x size x size x 3 uint8) that
training memory-maps: reading a crop is then a memory copy, not a JPEG decode (see BENCHMARKS.md).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import labels as L
from .detector import FaceDetector
from .geometry import crop_landmarks, crop_square, square_around
from .imageio import UnreadableImage, atomic_write_bytes, encode_jpeg, load_photo
from .journal import JOURNAL, fingerprint, read_journal, remove_stale_temp_files, unit_record
from .journal import compact as compact_journal
from .layouts import LayoutError, Photo, discover
from .manifest import STATUSES, pack_crops, read_meta, write_manifest
from .runtime import OptionError, check_device
from .faces import choose_unit, detect_and_choose
from .subject import DEFAULT_PRIOR, Choice, Prior

CROP_VERSION = 2  # bump when the crop geometry, encoding or journal changes: it invalidates every cache
MIN_PRIOR_PHOTOS = 10  # chosen faces needed to learn a folder's face prior
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
    detected: int              # photos detected in this run, all ranks together (0: everything came from the cache)
    warnings: list[str] = field(default_factory=list)
    prior: Prior | None = None  # the face prior this folder teaches (learned, or the one it was given)


def crop_dataset(raw: Path, out: Path, config: CropConfig = CropConfig(), detector: FaceDetector | None = None,
                 on_progress: Callable[[int, int], None] | None = None, rank: int = 0, world: int = 1,
                 barrier: Callable[[], None] | None = None, prior: Prior | None = None,
                 broadcast: Callable[[object], object] | None = None, overwrite: bool = False) -> CropResult:
    """Crop every photo of `raw` into `out` and write `out/manifest.csv`.

    >>> res = crop_dataset(Path("data_samples/train"), Path("/tmp/crops"))
    >>> res.counts   # {'ok': 55, 'relaxed': 0, 'person_box': 1, 'prior_box': 0, ...}

    `prior` chooses the face of a lone photo (no other photos of its person: the eval set): give the
    training crops' prior (`Prior.from_dict(read_meta(TRAIN_CROPS)["prior"])`, what predict does) so
    eval photos are cropped as the training photos were; without it a built-in portrait prior is used.
    `on_progress(done, total)` is called as photos finish. Under torchrun (`world` > 1) rank 0 plans
    the work (what the cache already holds) and `broadcast`s the plan, so no rank plans from a file
    system that a faster rank is already writing; each rank crops its share of the persons and rank 0
    writes the one manifest (same rows, same order) and returns the whole result; the other ranks
    return their share (no counts). A single process holds `out/.lock` while it works: two crops into
    one folder (two predicts sharing a cache) take turns instead of clashing. A folder holding the crops
    of another RAW is refused unless `overwrite`: runs trained on it would silently point at other data.
    """
    config.check()
    raw, out = Path(raw).resolve(), Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise LayoutError(f"--out {out} is a file, not a folder: give a folder for the crops")
    made_from = crops_of_other_photos(out, raw)
    if made_from and not overwrite:
        raise LayoutError(f"{out} holds the crops of {made_from}, not of {raw}: give another --out, or --overwrite "
                          "to replace them (runs trained on those crops would then point at other photos)")
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
    with (_folder_lock(out) if world == 1 else contextlib.nullcontext()):
        return _crop_locked(raw, out, found, config, detector, prior or DEFAULT_PRIOR, on_progress, rank, world,
                            barrier, broadcast)


@contextlib.contextmanager
def _folder_lock(out: Path):
    """An exclusive lock on `out/.lock` for the duration (released by the kernel if the process dies)."""
    with open(out / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class _Plan:
    """What a run has to do: the units to detect or re-cut (with their fingerprints and cached
    detections), the units the cache already holds in full, and each unit's fingerprints."""
    todo: list            # (unit, fingerprints, per-photo cached detection or None)
    done: dict            # unit sources → its journal line (`unit_record`), or where this run wrote it in its journal
    chosen: dict          # unit sources → choices (made once)
    unit_fps: list        # per unit, per photo fingerprint


def _plan(raw: Path, out: Path, units, paths, key: str, params: dict, prior: Prior) -> _Plan:
    cache = read_journal(out, key)
    if cache:
        remove_stale_temp_files(out)  # a killed run may have left half-written '.<name>.tmp' files
    plan = _Plan([], {}, {}, [])
    for u in units:
        fps = [fingerprint(raw / p.source) for p in u]  # taken once: the journal records what was read
        plan.unit_fps.append(fps)
        hits = [cache.get(p.source) for p in u]
        dets = [h["det"] if h and h["fp"] == fp else None for h, fp in zip(hits, fps)]
        boxes = [h["crop_box"] if h and h["fp"] == fp and h["crop"] == params else None for h, fp in zip(hits, fps)]
        if all(d is not None for d in dets):
            choices = choose_unit(u, dets, prior)
            if _current(out, paths, u, dets, boxes, choices):
                plan.done[tuple(p.source for p in u)] = unit_record(key, [p.source for p in u], fps, params, dets,
                                                                    boxes)
                plan.chosen[tuple(p.source for p in u)] = choices
                continue
        plan.todo.append((u, fps, dets))
    return plan


def _crop_locked(raw, out, found, config, detector, prior, on_progress, rank, world, barrier, broadcast) -> CropResult:
    key = settings_key(config, detector)
    paths = crop_paths(found.photos)
    units = _units(found.photos)
    params = _crop_params(config)
    if world > 1:  # rank 0 plans (and cleans up) before any rank writes; the others take its plan
        plan = broadcast(_plan(raw, out, units, paths, key, params, prior) if rank == 0 else None)
    else:
        plan = _plan(raw, out, units, paths, key, params, prior)
    done, chosen = plan.done, plan.chosen
    mine = plan.todo[rank::world]
    detected = sum(d is None for _, _, dets in plan.todo for d in dets)
    journal_path = out / (JOURNAL if world == 1 else f".journal.rank{rank}.jsonl")
    _crop_units(raw, out, paths, mine, key, params, config, detector, prior, journal_path, done, chosen, on_progress)
    if world > 1:
        barrier()  # every rank's journal is complete
        if rank == 0:  # rank 0 alone merges the journals and writes; the others return their share
            merged = read_journal(out, key)
            for u, fps in zip(units, plan.unit_fps):
                k = tuple(p.source for p in u)
                if k not in done:
                    done[k] = unit_record(key, list(k), fps, params, [merged[s]["det"] for s in k],
                                          [merged[s]["crop_box"] for s in k])
    with open(journal_path, "rb") as written:
        def line(k) -> str:
            """A finished unit's journal line: held as text, or read back from where this run wrote it."""
            if isinstance(done[k], str):
                return done[k]
            written.seek(done[k])
            return written.readline().decode().rstrip("\n")

        rows_of = {}
        for u in units:
            k = tuple(p.source for p in u)
            if k in done:  # a unit another rank (torchrun) cropped was not chosen in this process yet
                det = json.loads(line(k))["det"]
                choices = chosen[k] if k in chosen else choose_unit(u, det, prior)
                rows_of.update(zip(k, _rows(u, det, choices, paths, config)))
        if rank != 0:
            return CropResult(out, found.layout, [rows_of[p.source] for p in found.photos if p.source in rows_of],
                              {}, detected, found.warnings)
        rows = [rows_of[p.source] for p in found.photos]
        counts = {s: 0 for s in STATUSES if s != "no_face"}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        learned = _learn_prior(units, rows_of)
        meta = {"version": CROP_VERSION, "key": crops_key(config, detector), "layout": found.layout, "raw": str(raw),
                "config": asdict(config), "detector": detector.settings, "engine": getattr(detector, "engine", None),
                "counts": counts, "rows": len(rows), "prior": (learned or prior).to_dict(),
                "prior_used": prior.to_dict()}
        write_manifest(out, rows, meta)
        compact_journal(out, (line(tuple(p.source for p in u)) for u in units))
    if config.pack:
        pack_crops(out, rows, config.size, config.workers)
    # No collective after rank 0's writes: the other ranks need nothing more (they wait for rank 0 in
    # Dist.close(), on the rendezvous store).
    return CropResult(out, found.layout, rows, counts, detected, found.warnings, learned or prior)


def _crop_units(raw, out, paths, mine, key, params, config, detector, prior, journal_path, done, chosen,
                on_progress) -> None:
    """Detect, choose and crop this rank's units, journalling each chunk once its crops are on disk. A
    finished unit is held in `done` as the offset of its line in the journal, not as its detections (at
    the competition's size those grew the crop's peak memory with the folder: BENCHMARKS §27)."""
    total = sum(len(u) for u, *_ in mine)
    with ThreadPoolExecutor(max(1, config.workers)) as pool, open(journal_path, "ab") as journal:
        if journal.tell() and not _ends_a_line(journal_path):
            journal.write(b"\n")  # a kill tore the last line: this run's records start on lines of their own
        finished = 0

        def record(chunk, recs, writes, choices):
            """Journal a chunk once its crops are on disk: the journal never vouches for a missing crop."""
            nonlocal finished
            for f in writes:
                f.result()
            for (u, fps, _), rec, c in zip(chunk, recs, choices):
                k = tuple(p.source for p in u)
                done[k] = journal.tell()
                journal.write(unit_record(key, list(k), fps, params, rec["det"], rec["crop_boxes"]).encode() + b"\n")
                chosen[k] = c
            journal.flush()
            os.fsync(journal.fileno())
            finished += sum(len(u) for u, *_ in chunk)
            if on_progress:
                on_progress(finished, total)

        pending = None  # the previous chunk: its crops are encoded while this chunk is detected
        for chunk, images, digests in _prefetch(pool, raw, _chunks(mine, config.batch_size)):
            recs, writes, choices = _crop_chunk(pool, out, paths, chunk, images, digests, config, detector, prior)
            if pending:
                record(*pending)
            pending = (chunk, recs, writes, choices)
        if pending:
            record(*pending)


def _ends_a_line(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def crops_of_other_photos(out: Path, raw: Path) -> str | None:
    """The RAW whose crops the folder `out` holds, when that is not `raw` (None for a new folder or raw's own)."""
    made_from = read_meta(out).get("raw") if Path(out).is_dir() else None
    return made_from if made_from and Path(made_from) != Path(raw).resolve() else None


def settings_key(config: CropConfig, detector: FaceDetector) -> str:
    """Hash of everything that changes the faces found: the detector's settings (not labels, crop size
    or margin, workers, device or batch size; another size or margin re-cuts crops without detecting)."""
    relevant = {"v": CROP_VERSION, "detector": detector.settings}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def crops_key(config: CropConfig, detector: FaceDetector) -> str:
    """Hash of what makes two crops folders' pixels comparable (crops.json's `key`: predict warns when
    the photos it is given were cropped otherwise than the training photos)."""
    return hashlib.sha256(json.dumps([settings_key(config, detector), _crop_params(config)]).encode()).hexdigest()[:16]


def _crop_params(config: CropConfig) -> dict:
    """What a crop's pixels depend on besides the photo and the box."""
    return {"size": config.size, "margin": config.margin}


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
    """(pixels or the UnreadableImage that says why not, the file's content digest or None)."""
    if p.status == "missing":
        return UnreadableImage(p.reason), None
    try:
        return load_photo(raw / p.source)
    except UnreadableImage as e:
        return e, None


def _prefetch(pool, raw: Path, chunks):
    """Yield (chunk, images, digests) with the next chunk's photos already decoding in the pool."""
    def submit(chunk):
        return [[pool.submit(_load, raw, p) for p in u] for u, *_ in chunk]
    it = iter(chunks)
    cur = next(it, None)
    futs = submit(cur) if cur else None
    while cur is not None:
        nxt = next(it, None)
        nfuts = submit(nxt) if nxt else None
        loaded = [[f.result() for f in uf] for uf in futs]
        yield cur, [[im for im, _ in u] for u in loaded], [[d for _, d in u] for u in loaded]
        cur, futs = nxt, nfuts


def _crop_chunk(pool, out: Path, paths: dict[str, str], chunk, images, digests, config: CropConfig,
                detector: FaceDetector, prior: Prior) -> list[dict]:
    """Detect (where the cache has no detection), choose the subject, and start writing the crops.
    Returns (per unit its journal record {"det": per-photo detection, "crop_boxes": the box each crop is
    cut from}, the writes' futures, per unit its choices)."""
    dets = [[d if d is not None else
             {"w": im.shape[1], "h": im.shape[0], "cands": [], "relaxed": False} if isinstance(im, np.ndarray)
             else {"error": str(im), "status": im.status} for d, im in zip(cached, imgs)]
            for (_, _, cached), imgs in zip(chunk, images)]
    for ud, udig in zip(dets, digests):  # the photo's content, for `train --extra`'s same-photo check
        for d, digest in zip(ud, udig):
            if digest and "error" not in d:
                d["sha256"] = digest
    chosen = detect_and_choose(chunk, images, dets, detector, prior)
    recs, writes = [], []
    for ui, (unit, _, _) in enumerate(chunk):
        choices = chosen[ui]
        for p, img, c in zip(unit, images[ui], choices):
            writes.append(pool.submit(_write_crop, out, paths[p.source], config, img, c))
        recs.append({"det": dets[ui], "crop_boxes": [None if c is None else [float(v) for v in c.box] for c in choices]})
    return recs, writes, chosen


def _current(out: Path, paths, unit: list[Photo], dets: list[dict], crop_boxes: list, choices: list) -> bool:
    """Whether a cached unit needs no work: no pass left to run, every crop cut from today's choice and on disk."""
    for p, c, d, cb in zip(unit, choices, dets, crop_boxes):
        if not (out / paths[p.source]).is_file():
            return False
        if c is not None and ((c.index is None and not d["relaxed"]) or cb is None
                              or not np.allclose(cb, c.box, atol=1e-3)):
            return False
    return True


def _write_crop(out: Path, crop_rel: str, config: CropConfig, img, choice: Choice | None) -> None:
    """Write the crop (grey for a photo without pixels)."""
    if choice is None:
        crop = np.full((config.size, config.size, 3), GREY, np.uint8)
    else:
        crop = crop_square(img, *square_around(choice.box, config.margin), config.size)
    atomic_write_bytes(out / crop_rel, encode_jpeg(crop))


def _rows(unit: list[Photo], dets: list[dict], choices: list[Choice | None], paths: dict[str, str],
          config: CropConfig) -> list[dict]:
    """The manifest rows of a unit: labels from the raw folder (this run's), face from the detection."""
    rows = []
    for p, d, c in zip(unit, dets, choices):
        age_group = L.age_group(p.age, config.old)
        row = {"image_id": p.image_id, "source": p.source, "crop": paths[p.source], "person_id": p.person_id,
               "gender": p.gender, "race": p.race, "age": p.age, "mask": p.mask, "age_group": age_group,
               "label": L.UNKNOWN if p.status == "bad_name" else L.encode(p.mask, p.gender, age_group),
               "status": p.status, "reason": p.reason, "x1": None, "y1": None, "x2": None, "y2": None,
               "score": None, "width": None, "height": None, "faces": None, "landmarks": None,
               "sha256": d.get("sha256")}
        if c is None:
            row["status"] = p.status or d.get("status", "unreadable")
            row["reason"] = d["error"]
        else:
            cand = d["cands"][c.index] if c.index is not None else None
            row.update(x1=c.box[0], y1=c.box[1], x2=c.box[2], y2=c.box[3], score=cand and cand[4],
                       width=d["w"], height=d["h"], faces=len(d["cands"]),
                       landmarks=cand and crop_landmarks(cand[6], c.box, config.margin, config.size))
            row["status"] = p.status or c.status
            row["reason"] = f"{p.reason}; face: {c.status}" if p.status == "bad_name" else (p.reason or c.reason)
        rows.append(row)
    return rows


def _learn_prior(units: list[list[Photo]], rows_of: dict[str, dict]) -> Prior | None:
    """The face prior this folder teaches: the boxes chosen in person units (found by the fast pass)."""
    boxes = [((r["x1"], r["y1"], r["x2"], r["y2"]), r["width"], r["height"]) for u in units if len(u) > 1
             for r in (rows_of[p.source] for p in u) if r["status"] == "ok"]
    return Prior.learn(boxes) if len(boxes) >= MIN_PRIOR_PHOTOS else None


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
