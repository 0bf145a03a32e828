"""The crop stage's detection journal (`CROPS/.journal.jsonl`): the cache that makes a rerun free.

One JSON line per finished unit (a person's photos, or a lone photo): the detector settings key, each
source file's fingerprint (size, mtime), what detection found (every candidate of both passes, the
photo's content digest) and the box each crop was cut from. Appended and fsynced as units finish, so
a killed run resumes; a torn last line is ignored; rewritten whole (`compact`) at the end of a run.
Under torchrun each rank appends to its own `.journal.rank<r>.jsonl`, merged by rank 0.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from .imageio import atomic_writer

JOURNAL = ".journal.jsonl"


def fingerprint(path: Path) -> list[int]:
    try:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, -1]


def read_journal(out: Path, key: str) -> dict[str, dict]:
    """Per photo (source) of earlier (possibly killed) runs with these detector settings: its file's
    fingerprint, detection, crop parameters and the box its crop was cut from. A torn last line is ignored."""
    photos = {}
    for path in sorted(out.glob(".journal*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a kill cut short
                if rec.get("key") == key and "det" in rec:
                    for src, fp, det, box in zip(rec["sources"], rec["fps"], rec["det"], rec["crop_boxes"]):
                        photos[src] = {"fp": fp, "det": det, "crop": rec["crop"], "crop_box": box}
    return photos


def remove_stale_temp_files(out: Path) -> None:
    for p in out.rglob(".*.tmp*"):
        if p.is_file():
            p.unlink(missing_ok=True)


def unit_record(key: str, sources: list[str], fps: list, crop: dict, det: list[dict], crop_boxes: list) -> str:
    """A finished unit's journal line (without its newline). Until the run ends, the crop stage holds a
    unit it detected as this line's offset in the journal, and a cached one as this text, never as Python
    objects: for 18,900 photos those were 33 MiB and grew the crop's peak with the folder (BENCHMARKS §27)."""
    return json.dumps({"key": key, "sources": sources, "fps": fps, "crop": crop, "det": det,
                       "crop_boxes": crop_boxes})


def compact(out: Path, records: Iterable[str]) -> None:
    """Rewrite the journal to hold exactly `records` (this run's units, as `unit_record` made them: the
    cache for the next run), line by line: the whole text is never held twice."""
    with atomic_writer(out / JOURNAL, text=True) as f:
        for line in records:
            f.write(line + "\n")
    for extra in out.glob(".journal.rank*.jsonl"):
        extra.unlink(missing_ok=True)
