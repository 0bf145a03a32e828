"""Data preparation in one pass (`prepare_data`), datasets over the manifest, label fixes, and
person-level splits.

Labels come only from the manifest's explicit columns. Splits are made over *people*, never photos:
a person's seven photos share a face, and a split that shares people between train and validation
measures memory, not generalisation. The split is stratified at the competition's age boundary
(`--val-old`), so runs that differ only in the training labels' `--old` validate on the same people.
Photos of `--extra` folders join training only, and never when they are photos of the training
crops themselves (compared by content, not name).
"""
from __future__ import annotations

import csv
import hashlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from preprocess import labels as L
from preprocess.imageio import content_digest, read_crop
from preprocess.manifest import TRAINABLE, packed_crops, read_manifest, read_meta

from classify.errors import ConfigError
from classify.metrics import few_people, unlearned_labels
from classify.data.masks import SYNTH_INCORRECT, synthesize
from classify.data.transforms import channels_first

LABEL_FIELDS = {"gender", "age", "mask"}
LABEL_RANGES = {"mask": (0, 2), "gender": (0, 1), "age": (0, 120)}


def load_rows(crops: Path, old: int = L.DEFAULT_OLD, label_fixes: Path | None = None,
              statuses: tuple[str, ...] = TRAINABLE, fixes: dict | None = None) -> tuple[list[dict], list[dict]]:
    """(all manifest rows, the rows to train/validate on). Each row keeps its manifest position in 'index'.

    Trainable: status in `statuses` (by default `manifest.TRAINABLE`: the fallbacks' crops still show
    the person, and dropping them would drop mostly masked faces, the ones MTCNN misses) and a known label.
    `fixes`: a dict that receives what `label_fixes` did (`apply_label_fixes`'s counts).
    """
    rows = read_manifest(crops, old=old)
    for i, r in enumerate(rows):
        r["index"] = i
    if label_fixes:
        done = apply_label_fixes(rows, Path(label_fixes), old)
        if fixes is not None:
            fixes.update(done)
    usable = [r for r in rows if r["status"] in statuses and r["label"] >= 0]
    return rows, usable


def apply_label_fixes(rows: list[dict], path: Path, old: int) -> dict:
    """Apply `image_id,field,value` corrections (field: gender, age, mask) in place; returns the counts
    {'fixes': lines applied, 'photos': photos they named, 'changed': photos whose label (class at `old`)
    changed, 'people': people among those, 'file': path}: a fix that names the value a photo already has
    changes nothing, and says so by its count.

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
    before = {id(r): r["label"] for r in rows}
    bad, n, touched = [], 0, {}
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
        lo, hi = LABEL_RANGES[field]
        if not lo <= v <= hi:
            bad.append(f"line {k}: {field} {value!r} is outside {lo}..{hi}")
            continue
        for r in targets:
            r[field] = v
            r["age_group"] = L.age_group(r["age"], old)
            r["label"] = L.encode(r["mask"], r["gender"], r["age_group"])
            touched[id(r)] = r
        n += 1
    if bad:
        raise ConfigError(f"--label-fixes {path}: {len(bad)} fix(es) name no photo or field, or give a value out of "
                          f"range (fields: mask 0..2, gender 0/1 or male/female, age 0..120): " + "; ".join(bad[:20]))
    changed = [r for k, r in touched.items() if before[k] != r["label"]]
    return {"file": str(path), "fixes": n, "photos": len(touched), "changed": len(changed),
            "people": len({person_key(r) for r in changed})}


def person_key(r: dict) -> str:
    """The unit of a split: the person id, or the photo itself when the data set has no person ids."""
    return r.get("person_id") or f"photo:{r['image_id']}"


def read_groups(path: Path, people: set[str]) -> dict[str, str]:
    """--groups FILE: CSV `person_id,group`, people who are one human (the same face under two ids, a
    duplicate folder): {person: group}. Every id must be a person of the crops, named once."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not {"person_id", "group"} <= set(reader.fieldnames or ()):
                raise ConfigError(f"--groups {path}: needs the columns person_id,group (found: "
                                  f"{','.join(reader.fieldnames or ()) or 'none'})")
            pairs = [(str(r["person_id"] or "").strip(), str(r["group"] or "").strip()) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"--groups {path}: {e}") from None
    out: dict[str, str] = {}
    unknown, twice, blank = [], [], 0
    for person, group in pairs:
        if not person or not group:
            blank += 1
        elif person not in people:
            unknown.append(person)
        elif person in out and out[person] != group:
            twice.append(person)
        else:
            out[person] = group
    if blank or unknown or twice:
        parts = ([f"{blank} row(s) without a person_id or group"] if blank else []) + \
                ([f"{len(unknown)} person id(s) the crops do not hold ({', '.join(unknown[:5])})"] if unknown else []) + \
                ([f"{len(twice)} person id(s) in two groups ({', '.join(twice[:5])})"] if twice else [])
        raise ConfigError(f"--groups {path}: " + "; ".join(parts))
    return out


def split_persons(rows: list[dict], seed: int = 42, val_ratio: float = 0.2, folds: int = 0, fold: int = 0,
                  old: int = L.DEFAULT_OLD, groups: dict[str, str] | None = None) -> dict[str, str]:
    """{person: 'train' | 'val'}, stratified on gender x age group at the boundary `old` (give the
    validation boundary, --val-old: the training labels' --old must not move validation people),
    reproducible from the seed.

    `groups` ({person: group}, --groups): the people of one group are one unit of the split, so they
    land on one side together (stratified by the group's first person); without it every person is
    a unit, and the split is the same as before the option existed.

    With `folds` = K > 1, each stratum's people are cut into K slices of their ranking and fold `fold`
    is the validation set, so the K validation sets partition the people.

    Within a stratum people are ranked by a hash of (seed, person), not by one random draw over all
    strata: a person added, removed or moved to another stratum moves nobody else but the one at a
    stratum's validation boundary (a shuffle would deal every later stratum anew)."""
    groups = groups or {}
    unit = {}  # person -> the unit it is split with
    strata: dict[tuple[int, int], list[str]] = {}
    seen = set()
    for r in rows:
        p = person_key(r)
        if p in unit:
            continue
        unit[p] = u = f"group:{groups[p]}" if p in groups else p
        if u not in seen:
            seen.add(u)
            strata.setdefault((r["gender"], L.age_group(r["age"], old)), []).append(u)
    def ranked(people):
        return sorted(people, key=lambda p: hashlib.blake2b(f"{seed}:{p}".encode(), digest_size=8).digest())

    out = {}
    if folds and folds > 1:
        if not 0 <= fold < folds:
            raise ConfigError(f"--fold must be in 0..{folds - 1}, got {fold}")
        if folds > len(seen):
            what = "people and groups" if groups else "people"
            raise ConfigError(f"--folds {folds}: more folds than the {len(seen)} {what} with a usable labelled photo; "
                              f"use --folds {len(seen)} or fewer")
        for k, key in enumerate(sorted(strata)):
            people = ranked(strata[key])
            for i, p in enumerate(people):
                # contiguous slices of the ranking (a person more or less moves one per slice edge), the
                # strata's slices rotated so small strata do not all land in fold 0
                out[p] = "val" if (i * folds // len(people) + k) % folds == fold else "train"
        return {p: out[u] for p, u in unit.items()}
    if not 0 < val_ratio < 1:
        raise ConfigError(f"--val-ratio must be between 0 and 1, got {val_ratio}")
    carry = 0.0
    for key in sorted(strata):
        people = ranked(strata[key])
        exact = len(people) * val_ratio + carry
        n_val = int(exact + 0.5)
        carry = exact - n_val  # rounding error passed on, so tiny strata add up to the right total
        for i, p in enumerate(people):
            out[p] = "val" if i < n_val else "train"
    return {p: out[u] for p, u in unit.items()}


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
        self._label_list = self.labels.tolist()
        self._packed_path = packed_crops(self.crops)
        self._packed = None
        self._pool = None  # this process's batch buffers (`_BatchPool`), made on the first batch

    def __getstate__(self):  # a DataLoader worker builds its batches in shared memory, not from the pool
        return {**self.__dict__, "_pool": None}

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def image(self, i: int, copy: bool = True) -> np.ndarray:
        """Row i's crop, H x W x 3 uint8; with copy=False possibly a read-only view of crops.npy."""
        r = self.rows[i]
        if r.get("root") is not None:  # a row of another crops folder (train --extra)
            return read_crop(Path(r["root"]) / r["crop"])
        if self._packed_path is not None:
            if self._packed is None:  # opened lazily: each DataLoader worker maps it itself
                self._packed = PackedCrops(self._packed_path)
            return self._packed.crop(r["index"], copy)
        return read_crop(self.crops / r["crop"])

    def _source(self, key) -> tuple[np.ndarray, int, int]:
        """(the image to transform, its label, its manifest index) for a key, the transform seeded for it."""
        i, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        row = self.rows[i]
        s = _sample_seed(self.seed, epoch, row["index"])
        label = self._label_list[i]
        synth = self.synth_mask and row["mask"] == 2 and row.get("landmarks")
        # a view of crops.npy where nothing writes it: the OpenCV transforms only read their input
        img = self.image(i, copy=bool(synth) or not getattr(self.transform, "reads_only", False))
        if synth:
            rng = np.random.default_rng([s, 1])
            if rng.random() < self.synth_mask:
                img, label = synthesize(img, row["landmarks"], label, rng)
        self.transform.set_seed(s)
        return img, label, row["index"]

    def __getitem__(self, key):
        """`key`: an index (augmented for `self.epoch`), or (index, epoch) from an `engine.EpochOrder`."""
        img, label, index = self._source(key)
        planes = getattr(self.transform, "planes", None)  # CropFlip: straight to the item's layout
        x = planes(img) if planes else channels_first(self.transform(image=img)["image"])
        return torch.from_numpy(x), torch.tensor(label), index

    def __getitems__(self, keys: list) -> list:
        """A batch's items (what a DataLoader asks for). Where the transform writes into a given array
        (`into`: CropFlip, EvalResize), every image goes straight into its slot of one batch tensor,
        N x 3 x H x W in channels-last memory (allocated in shared memory inside a worker, as the default
        collate does): no per-item array, no split into planes, no stack (BENCHMARKS §25). `collate` hands
        that tensor on; the default collate still works (it stacks the items' views). The pixels are
        `__getitem__`'s (tests/test_transforms.py)."""
        into = getattr(self.transform, "into", None)
        if into is None or not keys:
            return [self[k] for k in keys]
        labels, indices, slots, batch = [], [], None, None
        for j, k in enumerate(keys):
            img, label, index = self._source(k)
            if slots is None:
                batch = self._new_batch((len(keys), self.transform.size, self.transform.size, img.shape[2]))
                slots = batch.numpy()
            into(img, slots[j])
            labels.append(label)
            indices.append(index)
        items = _Batch()
        items.images = batch.permute(0, 3, 1, 2)
        items.labels, items.indices = torch.tensor(labels), torch.tensor(indices)
        items.extend(zip(items.images.unbind(0), items.labels.unbind(0), indices))
        return items

    def _new_batch(self, shape: tuple) -> "torch.Tensor":
        """An uint8 batch tensor of `shape` (n x size x size x channels) to write. In a DataLoader worker,
        a new one in shared memory, so the batch reaches the main process without a copy (torch's default
        collate does the same); in the process that trains or predicts, a buffer of `_BatchPool`, which
        nothing else holds any more."""
        from torch.utils.data import get_worker_info

        if get_worker_info() is None:
            if self._pool is None:
                self._pool = _BatchPool()
            return self._pool.take(shape)
        proto = torch.empty(0, dtype=torch.uint8)
        storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
        return proto.new(storage).view(shape)


class _Batch(list):
    """The items of one batch, whose images are views of one batch tensor (`images`), with the batch's
    labels and manifest indices as `collate` returns them."""

    images: "torch.Tensor"
    labels: "torch.Tensor"
    indices: "torch.Tensor"


class _BatchPool:
    """uint8 batch buffers, each handed out again once no tensor or array holds it any more.

    A fresh 4.8 MB batch (32 x 224 x 224 x 3) costs ~650 page faults, ~1.8 ms, a third of the time its
    32 items take (BENCHMARKS §26). A buffer is handed out as `torch.from_numpy` of a numpy array, and
    that tensor, every view of it and every array made from it keep a reference to the array: while
    any of them lives (the batch the training step still works on, a batch a user keeps) the array's
    reference count says so and the pool makes another buffer, so a held batch is never written."""

    KEEP = 4  # buffers kept; a batch asked for while all are held is a new tensor the pool forgets
    _UNHELD = 3  # the references of an array nobody holds, as `take` counts them: the list, `a`, getrefcount's

    def __init__(self):
        import threading

        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()  # two threads sharing a dataset must not both take one unheld buffer

    def take(self, shape: tuple) -> "torch.Tensor":
        with self._lock:
            free = None
            for k in range(len(self._arrays)):
                a = self._arrays[k]
                if sys.getrefcount(a) == self._UNHELD:
                    if a.shape == shape:
                        return torch.from_numpy(a)
                    free = k
            a = np.empty(shape, np.uint8)
            if free is not None:  # an unheld buffer of another shape (a short last batch) makes way
                self._arrays[free] = a
            elif len(self._arrays) < self.KEEP:
                self._arrays.append(a)
            return torch.from_numpy(a)


def collate(items: list) -> list:
    """A DataLoader's collate for CropDataset: [images N x 3 x H x W uint8, labels N, manifest indices N].
    A batch `__getitems__` built in place is handed on as it is; other items are stacked as the default
    collate stacks them."""
    from torch.utils.data import default_collate

    if isinstance(items, _Batch):
        return [items.images, items.labels, items.indices]
    return default_collate(items)


class PackedCrops:
    """crops.npy, memory-mapped read-only, whose mapped pages this process gives back every RELEASE_BYTES read.

    A process that reads a mapped file keeps every page it touched in its resident set until it unmaps
    it: a DataLoader worker of a 12,600-photo predict had read its half of crops.npy, 1.2 GB, and shown
    it as its RSS (BENCHMARKS §21). The pages stay in the page cache, so giving them back
    (`madvise(MADV_DONTNEED)`) costs a re-mapping fault on the next read of a crop, not a disk read; a
    crops.npy under the budget is never released. Views handed out stay valid: they re-map on access."""

    RELEASE_BYTES = 64 << 20

    def __init__(self, path: Path):
        import mmap

        header = np.load(path, mmap_mode="r")  # numpy reads the .npy header: shape, dtype, where the data start
        if not header.flags.c_contiguous:
            raise ValueError(f"{path}: not a C-ordered array, which pack_crops always writes")
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.array = np.ndarray(header.shape, header.dtype, buffer=self._map, offset=header.offset)  # a plain view
        del header
        # a file the budget holds whole stays mapped: releasing it would re-map all of it each pass of a training
        # run (3 x 30 faults a batch, BENCHMARKS §26)
        fits = self.array.nbytes <= self.RELEASE_BYTES
        self._release = getattr(mmap, "MADV_DONTNEED", None) if hasattr(self._map, "madvise") and not fits else None
        self._read = 0

    def crop(self, i: int, copy: bool = True) -> np.ndarray:
        """Crop i (H x W x 3 uint8): a copy, or (copy=False) a read-only view of the mapping."""
        if self._release is not None:
            self._read += self.array[i].nbytes
            if self._read > self.RELEASE_BYTES:
                self._map.madvise(self._release)
                self._read = 0
        return np.array(self.array[i]) if copy else self.array[i]


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest(), "little")




# -- one pass of data preparation ---------------------------------------------------------------------

@dataclass
class Data:
    rows: list[dict]              # every manifest row
    train_rows: list[dict]        # the training rows, --extra folders' rows last
    val_rows: list[dict]
    val_labels: np.ndarray        # the validation rows' labels at --val-old (what the competition scores)
    split: dict[str, str]
    dropped_near_boundary: int    # training photos left out by --drop-ages-near
    extra: int = 0                # training photos from --extra folders (the last ones of train_rows)
    warnings: list[str] = field(default_factory=list)
    label_fixes: dict | None = None  # --label-fixes: what it changed (apply_label_fixes)
    groups: dict | None = None       # --groups: {'file', 'groups', 'people'} (people split together)


def boundary_distance(age: int, old: int) -> int:
    """Years to the nearest age-group boundary, counted so that the two ages on either side of a
    boundary are both 1 away (29 and 30 for the boundary 30; 59 and 60 for old = 60)."""
    return min(b - age if age < b else age - b + 1 for b in (L.YOUNG, old))



def prepare_data(cfg) -> Data:
    """Manifest rows → person-level split (stratified at --val-old) → training rows labelled at --old
    (less --drop-ages-near), validation labels at --val-old, then the --extra folders' rows."""
    crops = Path(cfg.crops)
    fixes: dict = {}
    rows, usable = load_rows(crops, cfg.old, Path(cfg.label_fixes) if cfg.label_fixes else None, fixes=fixes)
    if not usable:
        raise ConfigError(f"{crops}/manifest.csv has no photo with a known label and a usable crop")
    # Split on the labels as cropped: a run with --label-fixes validates on the same people as one without,
    # so `compare` sets them side by side on equal terms (a fixed person keeps its side, with its fixed label).
    split_rows = load_rows(crops, cfg.old)[1] if cfg.label_fixes else usable
    groups = read_groups(Path(cfg.groups), {person_key(r) for r in rows}) if cfg.groups else {}
    split = split_persons(split_rows, cfg.seed, cfg.val_ratio, cfg.folds, 0 if cfg.fold == "all" else cfg.fold,
                          cfg.val_old, groups)
    side_of_group = {g: split[p] for p, g in groups.items() if p in split}
    for r in usable:  # a person only the fixes made usable trains (it was in no split), or joins its group's side
        p = person_key(r)
        split.setdefault(p, side_of_group.get(groups.get(p), "train"))
    train_rows = [r for r in usable if split[person_key(r)] == "train"]
    val_rows = [r for r in usable if split[person_key(r)] == "val"]
    dropped = 0
    if cfg.drop_ages_near:
        kept = [r for r in train_rows if boundary_distance(r["age"], cfg.old) > cfg.drop_ages_near]
        dropped, train_rows = len(train_rows) - len(kept), kept
    if not train_rows or not val_rows:
        raise ConfigError(f"the split left {len(train_rows)} training and {len(val_rows)} validation photos; "
                          "use more people or another --val-ratio/--folds")
    val_labels = np.array([L.encode(r["mask"], r["gender"], L.age_group(r["age"], cfg.val_old)) for r in val_rows])
    warnings: list[str] = []
    made = (read_meta(Path(cfg.crops)).get("config") or {}).get("size")
    if made and cfg.img_size > made:  # every crop is blown up: the model pays for pixels that hold nothing new
        warnings.append(f"--img-size {cfg.img_size} is larger than the crops ({made} px, `maskcls crop --size "
                        f"{made}`): every crop is upscaled, which adds compute and no detail; crop again with "
                        f"--size {cfg.img_size} or more, or train at --img-size {made}")
    extra = extra_rows(cfg, rows, warnings, split)
    grouped = {"file": str(cfg.groups), "groups": len(set(groups.values())), "people": len(groups)} if groups else None
    return Data(rows, train_rows + extra, val_rows, val_labels, split, dropped, len(extra), warnings, fixes or None,
                grouped)


def people_of(rows: list[dict]) -> int:
    return len({person_key(r) for r in rows})


def validation_caution(data: Data, every_person: bool, what: str | None = None) -> str | None:
    """The few-people caution of a run's score (metrics.few_people): its validation people's, or with
    `every_person` (a k-fold run's out-of-fold score) every person of the split's."""
    people = len(data.split) if every_person else people_of(data.val_rows)
    return few_people(people, what or ("the out-of-fold score" if every_person else "validation"))


def extra_rows(cfg, main_rows: list[dict], warnings: list[str], split: dict[str, str] | None = None) -> list[dict]:
    """The usable rows of every --extra crops folder, for training only (never validation: each is
    read from its own folder and joins no split). A folder pseudo-labelled at another --old, holding
    a photo of the training crops (same bytes), or holding photos of a validation person (same person id)
    is refused. A person id that is also a main person's is prefixed with the folder (`extra1:000123`), so it
    never stands for that person in split.csv; their `index` is offset per folder so that their augmentation
    seeds differ from the main folder's."""
    out = []
    own = None
    mine = read_meta(Path(cfg.crops)).get("key") if cfg.extra else None  # the training crops' settings
    for k, folder in enumerate(cfg.extra, start=1):
        folder = Path(folder)
        check_extra(folder, cfg.old)
        meta = read_meta(folder)
        unlearned = (meta.get("pseudo") or {}).get("unlearned")
        if unlearned:
            warnings.append(f"--extra {unlearned_labels(folder, unlearned)}")
        if meta.get("key") and mine and meta["key"] != mine:  # another size, margin or detector: other framing
            warnings.append(f"--extra {folder} was cropped with other settings than {cfg.crops}: its photos are framed "
                            f"otherwise than those validation and predict see (crop size, margin or detector; key "
                            f"{meta['key']} vs {mine}); crop (or pseudo-label) them with the training crops' settings")
        _, usable = load_rows(folder, cfg.old)
        if own is None:
            own = {d: r for r, d in zip(main_rows, photo_digests(Path(cfg.crops), main_rows)) if d}
        digests = photo_digests(folder, usable)
        same = [(r, own[d]) for r, d in zip(usable, digests) if d and d in own]
        if same:
            examples = ", ".join(f"{r['image_id']} = {m['image_id']}" for r, m in same[:3])
            raise ConfigError(f"--extra {folder}: {len(same)} of its photos are photos of the training crops "
                              f"{cfg.crops} (same content: {examples}); their labels would carry validation photos "
                              "into training. Pseudo-label photos outside the training set (the eval set)")
        val_people = sorted({r["person_id"] for r in usable if r["person_id"] and (split or {}).get(r["person_id"]) == "val"})
        if val_people:
            raise ConfigError(f"--extra {folder}: it holds photos of {len(val_people)} validation person(s) of {cfg.crops} "
                              f"(same person id: {', '.join(val_people[:3])}); training on them would leak those people "
                              "into validation. Remove them from the folder, or give them other ids if they are others")
        unknown = sum(d is None for d in digests)
        if unknown:
            warnings.append(f"--extra {folder}: {unknown} photo(s) could not be compared with the training photos "
                            "(no content hash in its manifest and the photo is not readable); crop them again to check")
        main_people = {person_key(r) for r in main_rows}
        for r in usable:
            pid = person_key(r)
            out.append(r | {"root": str(folder.resolve()), "index": k * 10_000_000 + r["index"],
                            "person_id": f"extra{k}:{pid}" if pid in main_people else r["person_id"]})
    return out


def check_extra(folder: Path, old: int) -> None:
    """Refuse a pseudo-label folder made at another age boundary (its `age` holds the group's representative)."""
    made = (read_meta(folder).get("pseudo") or {}).get("old")
    if made is not None and made != old:
        raise ConfigError(f"--extra {folder}: pseudo-labelled with --old {made}, but this run trains with --old {old}; "
                          f"train with --old {made} or pseudo-label with a model trained at --old {old}")


def photo_digests(crops: Path, rows: list[dict]) -> list[str | None]:
    """Each row's photo content hash: the manifest's `sha256` column, else the photo's bytes hashed
    where the raw folder it was cropped from is still there; None where neither is known."""
    raw = read_meta(crops).get("raw")
    out = []
    for r in rows:
        d = r.get("sha256") or None
        if d is None and raw and r.get("source"):
            try:
                d = content_digest((Path(raw) / r["source"]).read_bytes())
            except OSError:
                d = None
        out.append(d)
    return out


def expected_class_counts(rows: list[dict], synth_mask: float) -> np.ndarray:
    """Training photos per class as training will see them: with --synth-mask P an unmasked photo with
    landmarks is drawn masked with probability P (incorrect with SYNTH_INCORRECT, else wear), so its
    count moves, in expectation, to those classes. The wce weights are counted on this mix."""
    counts = np.zeros(L.NUM_CLASSES)
    for r in rows:
        y = r["label"]
        if synth_mask and r["mask"] == 2 and r.get("landmarks"):
            _, gender, age = L.decode(y)
            counts[y] += 1 - synth_mask
            counts[L.encode(1, gender, age)] += synth_mask * SYNTH_INCORRECT
            counts[L.encode(0, gender, age)] += synth_mask * (1 - SYNTH_INCORRECT)
        else:
            counts[y] += 1
    return counts
