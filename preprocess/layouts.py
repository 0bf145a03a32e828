"""Finding the photos of a raw data set and their explicit labels.

Three layouts are recognised, in this order:

1. generic: ``RAW/labels.csv`` with ``path,mask,gender,age`` (optional ``person_id``), paths relative to RAW;
2. competition eval: ``RAW/info.csv`` (``ImageID,ans``) and ``RAW/images/<ImageID>``; labels unknown;
3. competition train: ``RAW/images/<id>_<gender>_<race>_<age>/<mask1..5|incorrect_mask|normal>.<ext>``
   (or the person folders directly in RAW); ``RAW/train.csv`` is optional and only cross-checked.

Labels come from the folder and file *names*, parsed field by field, never from a listing order.
Problems that make continuing wrong (duplicate ids, labels out of range, paths escaping RAW) raise
`LayoutError` naming every offender before any work; problems that concern one photo (a folder name
that does not parse, an unknown file name, a file listed but missing) become that photo's status.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from . import labels as L

IMAGE_EXTS = {".jpg", ".jpeg", ".png"}
PERSON_RE = re.compile(r"^(?P<id>[^_]+)_(?P<gender>[^_]+)_(?P<race>.+)_(?P<age>[^_]+)$")


class LayoutError(Exception):
    """The raw folder cannot be read as any known layout, or holds contradictions; the message lists them."""


@dataclass(frozen=True)
class Photo:
    image_id: str
    source: str  # relative to RAW, posix separators
    person_id: str = ""
    gender: int = L.UNKNOWN
    race: str = ""
    age: int = L.UNKNOWN
    mask: int = L.UNKNOWN
    status: str = ""  # preset status: 'bad_name' or 'missing'; '' means "to be cropped"
    reason: str = ""


@dataclass
class Discovery:
    layout: str
    photos: list[Photo]
    warnings: list[str] = field(default_factory=list)


def discover(raw: Path) -> Discovery:
    """List every photo of RAW with its labels, in a stable order (see module doc)."""
    raw = Path(raw)
    if not raw.is_dir():
        raise LayoutError(f"{raw} is not a folder")
    if (raw / "labels.csv").is_file():
        d = _generic(raw)
    elif (raw / "info.csv").is_file():
        d = _eval(raw)
    elif (raw / "train").is_dir() and (raw / "eval").is_dir():
        raise LayoutError(f"{raw} is the competition download (it holds train/ and eval/): crop {raw / 'train'} "
                          f"for training (maskcls crop {raw / 'train'} --out CROPS), and give {raw / 'eval'} to "
                          "maskcls predict")
    else:
        images = raw / "images" if (raw / "images").is_dir() else raw
        d = _train(raw, images)
    dup = _duplicates(p.image_id for p in d.photos)
    if dup:
        raise LayoutError(f"{len(dup)} image id(s) occur more than once (each photo needs one id): " + ", ".join(dup[:20]))
    return d


def safe_relative(root: Path, rel: str, what: str) -> str:
    """`rel` as a clean posix path inside `root`; raises LayoutError for absolute paths or `..` escapes."""
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or re.match(r"^[A-Za-z]:", rel) or ".." in p.parts or not p.parts:
        raise LayoutError(f"{what}: path {rel!r} must be relative and stay inside {root}")
    return str(p)


def _duplicates(ids) -> list[str]:
    seen, dup = set(), []
    for i in ids:
        if i in seen and i not in dup:
            dup.append(i)
        seen.add(i)
    return dup


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: tolerate a BOM
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise LayoutError(f"{path} is empty")
        reader.fieldnames = [h.strip() for h in reader.fieldnames]
        return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def _generic(raw: Path) -> Discovery:
    rows = _read_csv(raw / "labels.csv")
    need = {"path", "mask", "gender", "age"}
    if rows and not need <= set(rows[0]):
        raise LayoutError(f"{raw / 'labels.csv'} needs columns {sorted(need)}, has {sorted(rows[0])}")
    photos, errors = [], []
    for n, row in enumerate(rows, start=2):
        try:
            src = safe_relative(raw, row["path"], f"labels.csv line {n}")
            mask = _int_in(row["mask"], 0, 2, "mask")
            g = L.gender_of(row["gender"])
            gender = g if g is not None else _int_in(row["gender"], 0, 1, "gender")
            age = _int_in(row["age"], 0, 130, "age")
        except LayoutError as e:
            errors.append(f"line {n}: {e}")
            continue
        photos.append(Photo(image_id=src, source=src, person_id=row.get("person_id", ""),
                            gender=gender, age=age, mask=mask, race=row.get("race", "")))
    if errors:
        raise LayoutError(f"{raw / 'labels.csv'} has {len(errors)} bad row(s): " + "; ".join(errors[:20]))
    d = Discovery("generic", photos)
    _mark_missing(raw, d)
    return d


def _int_in(text: str, lo: int, hi: int, name: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise LayoutError(f"{name} {text!r} is not a whole number") from None
    if not lo <= v <= hi:
        raise LayoutError(f"{name} {v} is outside {lo}..{hi}")
    return v


def _eval(raw: Path) -> Discovery:
    rows = _read_csv(raw / "info.csv")
    if rows and "ImageID" not in rows[0]:
        raise LayoutError(f"{raw / 'info.csv'} needs an ImageID column, has {sorted(rows[0])}")
    photos, errors = [], []
    for n, row in enumerate(rows, start=2):
        try:
            name = safe_relative(raw, row["ImageID"], f"info.csv line {n}")
        except LayoutError as e:
            errors.append(str(e))
            continue
        photos.append(Photo(image_id=name, source=f"images/{name}"))
    if errors:
        raise LayoutError(f"{raw / 'info.csv'}: " + "; ".join(errors[:20]))
    d = Discovery("eval", photos)
    _mark_missing(raw, d)
    listed = {p.source for p in photos}
    if (raw / "images").is_dir():
        extra = sorted(p.name for p in (raw / "images").iterdir() if p.is_file() and not p.name.startswith(".")
                       and f"images/{p.name}" not in listed)
        if extra:
            d.warnings.append(f"{len(extra)} file(s) in images/ are not listed in info.csv and were not cropped: "
                              + ", ".join(extra[:10]))
    return d


def _mark_missing(raw: Path, d: Discovery) -> None:
    for i, p in enumerate(d.photos):
        if not (raw / p.source).is_file():
            d.photos[i] = Photo(**{**p.__dict__, "status": "missing", "reason": f"file not found: {p.source}"})


def _train(raw: Path, images: Path) -> Discovery:
    folders = sorted(p for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
    # A crops folder written inside RAW (`maskcls crop people --out people/crops`) is maskcls' output, not a
    # person: read as one, its files became bad_name photos and the next crop of RAW failed on their ids.
    ours = [p for p in folders if (p / "crops.json").is_file() and (p / "manifest.csv").is_file()]
    folders = [p for p in folders if p not in ours]
    if not folders and any(p.suffix.lower() in IMAGE_EXTS for p in images.iterdir()):
        where = next((d for d in (raw.parent, raw.parent.parent) if (d / "info.csv").is_file()), None)
        if where is not None:
            raise LayoutError(f"{raw} holds the photos of an eval folder: give its parent {where} (it holds info.csv)")
        raise LayoutError(f"{raw} holds loose photos without labels: list them in RAW/labels.csv (path,mask,gender,age) "
                          "or RAW/info.csv (ImageID) beside RAW/images/, or put each person's photos in a folder "
                          "<id>_<gender>_<race>_<age>")
    if not folders:
        raise LayoutError(
            f"{raw} matches no known layout. Expected one of: RAW/images/<id>_<gender>_<race>_<age>/"
            "<mask1..mask5|incorrect_mask|normal>.<jpg|jpeg|png> (competition train); RAW/info.csv + "
            "RAW/images/<ImageID> (competition eval); RAW/labels.csv with path,mask,gender,age (generic).")
    rel_images = images.relative_to(raw).as_posix()
    prefix = "" if rel_images == "." else rel_images + "/"
    photos: list[Photo] = []
    warnings: list[str] = []
    owner: dict[str, list[str]] = {}
    hidden = 0
    for folder in folders:
        found, person_id, missing, skipped = _person_folder(folder, prefix)
        photos += found
        hidden += skipped
        if person_id is not None:
            owner.setdefault(person_id, []).append(folder.name)
        if missing:
            warnings.append(f"{folder.name} lacks {', '.join(missing)}")
    clash = {pid: names for pid, names in owner.items() if len(names) > 1}
    if clash:
        raise LayoutError("person id(s) used by more than one folder, so their photos could land in both train and "
                          "validation: " + "; ".join(f"{pid}: {', '.join(n)}" for pid, n in clash.items()))
    if hidden:
        warnings.append(f"{hidden} hidden file(s) (names starting with '.') ignored")
    if ours:
        warnings.append(f"{', '.join(p.name for p in ours)}: a maskcls crops folder (it holds crops.json), not a person: "
                        "skipped")
    if not any(Path(p.source).suffix.lower() in IMAGE_EXTS for p in photos):
        raise LayoutError(f"{images} holds {len(folders)} folder(s) but no photo (.jpg/.jpeg/.png) in them "
                          f"(e.g. {folders[0].name}/): is it the right folder? Expected "
                          "RAW/images/<id>_<gender>_<race>_<age>/<mask1..mask5|incorrect_mask|normal>.<jpg|jpeg|png>")
    order = {s: i for i, s in enumerate(L.MASK_FILES)}
    # Stable order: person folder name (as a string), then the canonical file order, unknown names last.
    photos.sort(key=lambda p: (p.image_id.split("/")[0], order.get(p.image_id.split("/")[1], 99), p.source))
    return Discovery("train", photos, warnings + _train_csv_warnings(raw, folders))


def _person_folder(folder: Path, prefix: str) -> tuple[list[Photo], str | None, list[str], int]:
    """One person folder's photos (a badly named folder or file gives `bad_name` rows, never a lost
    photo): (photos, the person id if the folder name parses, the mask files it lacks, hidden files skipped)."""
    m = PERSON_RE.match(folder.name)
    gender = L.gender_of(m["gender"]) if m else None
    age = int(m["age"]) if m and m["age"].isdigit() else None
    parsed = m is not None and gender is not None and age is not None
    photos: list[Photo] = []
    stems_seen, hidden = set(), 0
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        if f.name.startswith("."):
            hidden += 1  # macOS '._mask1.jpg' resource forks and the like
            continue
        stem, ext = f.stem, f.suffix.lower()
        image_id = f"{folder.name}/{stem}"
        src = prefix + f"{folder.name}/{f.name}"
        mask = L.mask_of_file(stem)
        if not parsed:
            photos.append(Photo(image_id, src, mask=mask if mask is not None else L.UNKNOWN, status="bad_name",
                                reason=f"folder name {folder.name!r} is not <id>_<male|female>_<race>_<age>"))
        elif ext not in IMAGE_EXTS or mask is None:
            photos.append(Photo(image_id, src, person_id=m["id"], gender=gender, race=m["race"], age=age,
                                status="bad_name",
                                reason=f"file name {f.name!r} is not one of mask1..mask5, incorrect_mask, normal "
                                       "with .jpg/.jpeg/.png"))
        else:
            stems_seen.add(stem)
            photos.append(Photo(image_id, src, person_id=m["id"], gender=gender, race=m["race"], age=age, mask=mask))
    missing = [s for s in L.MASK_FILES if s not in stems_seen] if parsed else []
    return photos, m["id"] if parsed else None, missing, hidden


def _train_csv_warnings(raw: Path, folders: list[Path]) -> list[str]:
    """Where RAW/train.csv and the person folders on disk disagree (the folders are cropped anyway)."""
    csv_path = raw / "train.csv"
    if not csv_path.is_file():
        return []
    listed = {r.get("path", "") for r in _read_csv(csv_path)}
    on_disk = {f.name for f in folders}
    out = []
    if listed - on_disk:
        out.append(f"train.csv lists {len(listed - on_disk)} folder(s) not on disk: " + ", ".join(sorted(listed - on_disk)[:10]))
    if on_disk - listed:
        out.append(f"{len(on_disk - listed)} folder(s) are not in train.csv (cropped anyway): "
                   + ", ".join(sorted(on_disk - listed)[:10]))
    return out
