"""`maskcls audit RUN --out DIR`: the training labels most likely wrong, judged by a k-fold run's out-of-fold
predictions (no photo is judged by a model that trained on it), and the fixes a user can apply unreviewed.

Per task, the way the competition gives labels:
- **mask, per person, on the competition's structure**: a competition person has five `wear` photos, one
  `incorrect` and one `not wear`. For each such person the 42 ways to give its seven photos that 5/1/1 are
  scored exactly by the out-of-fold probabilities (the product of each photo's probability of its mask);
  where the likeliest differs from the given one, the person is an `assignment` suspect (a `pair` where it
  is the incorrect/normal swap, the known error of this data set). Its score is the posterior probability
  that the given assignment is wrong (1 - its share of the 42 assignments' likelihood).
  A single photo that confident learning (cleanlab) flags but the structure does not explain is a `photo`
  suspect to review, never a default fix (changing it alone leaves its person with two incorrect photos,
  or none). Persons without the structure (the generic layout, partial persons) are judged per photo.
- **gender and age group, per person**: every photo of a person shares them, so the person's photos are
  aggregated (the mean of their task probabilities) and judged once by confident learning. Age is judged at
  the boundary the model's classes use (its `--old`), against the labels at that boundary.

Defaults a user can apply unreviewed: label_fixes.csv (and the page's pre-ticked rows) holds only the kinds
and scores whose precision was measured at >= 90% (DEFAULT_MIN, from bench/audit.py, BENCHMARKS §18); every
other suspect is listed unticked. A task the run has not learned (judged per unit: per photo for mask, per
person for gender and age; `metrics.unlearned_tasks`) gets no fixes and one caution. People without an
out-of-fold prediction (made usable only by the run's own --label-fixes) and image ids that are not unique
are named, not judged.

Writes `suspects.csv` (every suspect, most suspect first, with its fixes), `label_fixes.csv` (the default fixes,
in `train --label-fixes` format, each row naming exactly one person's photos: the person's folder where the
folder holds that person alone, else one row per photo), and `index.html`. A run trained with --label-fixes F
is judged on its fixed labels, and its label_fixes.csv starts with F's rows (but those a new fix replaces), so the
file always applies to the crops as cropped: a second round trains with it alone.
"""
from __future__ import annotations

import csv
import html
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from preprocess import labels as L
from preprocess.imageio import atomic_write_bytes

from classify.data.dataset import load_rows, people_of, person_key
from classify.errors import ConfigError
from classify.metrics import FEW_VAL_PEOPLE, learned_margin, unlearned_tasks
from classify.inference import rundir
from classify.inference.answer import task_marginals
from classify.inference.calibration import apply_temperature

# The default fixes: per kind of suspect, the lowest score whose fixes were right >= 90% of the time on every
# one of bench/audit.py's six noisy workloads (BENCHMARKS §18: pairs at >= 0.8 49 of 51 right, no workload under
# 90.9%; gender at >= 0.5 19 of 19). None: never a default fix, review it: other 5/1/1 assignments (0 of 3
# right), single photos (0 of 28) and age (no age error was measured).
DEFAULT_MIN = {"pair": 0.8, "assignment": None, "photo": None, "gender": 0.5, "age": None}
# A task counts as learned when its out-of-fold accuracy beats the most common label by more than 2 standard
# errors of chance (metrics.unlearned_tasks): a run 2 points above the baseline on 420 photos has learned
# nothing chance does not explain, and its fixes were 16 of 34 right (BENCHMARKS §18, out-of-identity folds).
LEARNED_SE = 2.0
PAGE_LIMIT = 300    # suspects shown on index.html (all of them are in suspects.csv)
WEAR, INCORRECT, NORMAL = 0, 1, 2
STRUCTURE = (5, 1, 1)  # a competition person's photos per mask status


@dataclass
class Suspect:
    kind: str           # "pair" (incorrect/normal swap), "assignment" (another 5/1/1), "photo" (mask), "person"
    id: str             # the image id (photo) or the person folder (pair, person)
    field: str          # mask, gender, age
    given: str
    suggested: str
    score: float
    photos: list[str]   # the image ids the page shows
    fixes: list[tuple[str, str, str]] = field(default_factory=list)  # (image_id, field, value) rows
    default: bool = False  # in label_fixes.csv and ticked on the page
    note: str = ""         # why it is not a default fix, where it is not


@dataclass
class AuditResult:
    suspects: list[Suspect]
    fixes: int                # new rows of label_fixes.csv (the suspects' default fixes)
    photos: int               # photos judged
    people: int
    out: Path
    cautions: list[str] = field(default_factory=list)  # why the suspects may say more about the model than the labels
    not_judged: list[str] = field(default_factory=list)  # what the audit could not judge, and why
    carried: int = 0          # rows of the run's own --label-fixes kept in label_fixes.csv (see _carried)
    carried_from: str | None = None  # that file


def _cleanlab():
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise ConfigError("maskcls audit needs cleanlab: pip install 'maskcls[audit]'") from None
    return find_label_issues, get_label_quality_scores


EPOCHS = ("best", "last")


def out_of_fold(run: Path, epoch: str = "best") -> tuple[list[str], np.ndarray, dict]:
    """(image ids, calibrated probabilities N x 18, the run's config) of a k-fold run's out-of-fold photos:
    each fold's best epoch's logits (val_logits.npz), or its last epoch's probabilities (`epoch="last"`:
    val_predictions_last.csv, an epoch chosen by nothing, so not tilted toward the given labels)."""
    if epoch not in EPOCHS:
        raise ConfigError(f"--epoch {epoch!r}: choose best or last")
    run = Path(run)
    config = rundir.read_config(run)
    folds = rundir.fold_dirs(run)
    if not config:
        raise ConfigError(f"{run} is not a `maskcls train` run folder (no config.json)")
    parent = rundir.read_config(run.parent)
    if parent.get("fold") == "all" and run.name in {f.name for f in rundir.fold_dirs(run.parent)}:
        raise ConfigError(f"{run} is one fold of the k-fold run {run.parent}, whose other folds judge the photos this "
                          f"one trained on: audit the whole run (`maskcls audit {run.parent} --out DIR`)")
    if config.get("fold") != "all" or not folds:
        raise ConfigError(f"{run} is a single run: audit judges each photo by a model that never trained on it, "
                          "which takes out-of-fold predictions of every photo; train a k-fold run "
                          f"(`maskcls train {config.get('crops', 'CROPS')} --out RUN --folds 5 --fold all`) and audit it")
    need = rundir.VAL_LOGITS if epoch == "best" else rundir.VAL_PREDICTIONS_LAST
    missing = [f.name for f in folds if not (f / need).is_file()]
    missing += [f"fold{k}" for k in range(len(folds), int(config.get("folds") or 0))]
    if missing:
        raise ConfigError(f"{run}: the k-fold run has not finished ({', '.join(missing)} without validation "
                          f"logits); finish it with `maskcls train --resume --out {run}`")
    from classify.inference.card import card_of_run

    t = card_of_run(folds[0]).temperature  # what predict applies: the card's, one for every fold
    ids, probs = [], []
    for f in folds:
        if epoch == "best":
            i, z, _ = rundir.read_val_logits(f)
        else:
            i, p, _ = rundir.read_val_predictions(f / rundir.VAL_PREDICTIONS_LAST)
            z = np.log(np.clip(p, 1e-12, 1.0))
        ids += i
        probs.append(apply_temperature(z, t))
    return ids, np.concatenate(probs), config


def audit(run: Path, out: Path, min_score: float | None = None, crops: Path | None = None,
          epoch: str = "best") -> AuditResult:
    """Find the suspect labels of a k-fold run's training photos; write suspects.csv, label_fixes.csv and
    index.html into `out`. `min_score`: one threshold for every kind of suspect instead of the measured
    defaults (DEFAULT_MIN), for a user who reviews what it lets in.

    >>> audit(Path("runs/k5"), Path("runs/k5-audit"))   # then: maskcls train CROPS --label-fixes runs/k5-audit/label_fixes.csv
    """
    if min_score is not None and not 0 <= min_score <= 1:
        raise ConfigError(f"--min-score {min_score}: must be in [0, 1] (a suspect's score: how likely the given "
                          "label is wrong)")
    find_label_issues, quality_scores = _cleanlab()
    ids, probs, config = out_of_fold(run, epoch)
    if crops is not None and not (Path(crops) / "manifest.csv").is_file():
        raise ConfigError(f"--crops {crops}: not a crops folder (no manifest.csv); give the folder the run trained on")
    crops = Path(crops or config["crops"])
    if not (crops / "manifest.csv").is_file():
        raise ConfigError(f"{crops}: the run's crops folder is not there (give it with --crops)")
    old = int(config.get("old") or L.DEFAULT_OLD)  # the model's age classes: judged at its own boundary
    fixes = Path(config["label_fixes"]) if config.get("label_fixes") else None
    every, usable = load_rows(crops, old, fixes)  # the labels the run trained on
    earlier = _read_fixes(fixes) if fixes else []  # read before `out` (it may be the same folder) is written
    not_judged = _not_judged(every, usable, ids)
    rows = {r["image_id"]: r for r in every}
    unknown = [i for i in ids if i not in rows]
    if unknown:
        raise ConfigError(f"{crops}/manifest.csv has no photo {unknown[0]!r} of the run's out-of-fold predictions "
                          f"({len(unknown)} in all): is it the crops folder the run trained on?")
    rows = [rows[i] for i in ids]
    task = task_marginals(probs)
    unlearned = unlearned_tasks([r["label"] for r in rows], probs.argmax(1), [person_key(r) for r in rows],
                                margin_se=LEARNED_SE)
    suspects = _mask_suspects(rows, task["mask"], find_label_issues, quality_scores)
    for name in ("gender", "age"):
        suspects += _person_suspects(rows, task[name], name, old, find_label_issues, quality_scores)
    targets = _fix_targets(every)
    twice = _repeated_ids(every)
    for s in suspects:
        s.fixes = [f for fx in s.fixes for f in targets(fx)]
        s.default, s.note = _default(s, min_score, unlearned)
        if any(i in twice for i in s.photos):
            s.default, s.note = False, "an image id that names more than one photo: a fix would change them all"
    suspects.sort(key=lambda s: (-s.score, s.id, s.field))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_suspects(out / "suspects.csv", suspects)
    chosen = [s for s in suspects if s.default]
    new = [tuple(f) for s in chosen for f in s.fixes]
    kept = _carried(earlier, new)
    rundir.write_csv(out / "label_fixes.csv", ["image_id", "field", "value"], [list(f) for f in kept + new])
    people = people_of(rows)
    units = {"mask": len(rows), "gender": people, "age": people}
    need = {t: base + learned_margin(base, units[t], LEARNED_SE) for t, (_, base) in unlearned.items()}
    cautions = _cautions(people, unlearned, need)
    structured = sum(1 for s in _by_person(rows).values() if _structure_of(rows, s) is not None)
    _page(out, crops, {r["image_id"]: r for r in rows}, suspects, len(rows), people, Path(run), cautions,
          not_judged, structured, old, (fixes, earlier))
    return AuditResult(suspects, len(new), len(rows), people, out, cautions, not_judged, len(kept),
                       str(fixes) if fixes else None)


def _json_script(value) -> str:
    """JSON that is safe inside a <script> element (no '</' or '<!--' can end or open anything)."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _read_fixes(path: Path) -> list[tuple[str, str, str]]:
    """The (image_id, field, value) rows of a label-fixes CSV, as `apply_label_fixes` reads them."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [tuple((r.get(k) or "").strip() for k in ("image_id", "field", "value")) for r in csv.DictReader(f)]


def _carried(earlier: list[tuple], new: list[tuple]) -> list[tuple]:
    """The run's own fixes (its --label-fixes) that label_fixes.csv keeps so the file still applies to the crops
    as cropped: all but those a new fix of the same photo (or person) and field replaces. They come first: where
    the two name a photo differently (a person folder, then the photo) the later row, the new one, wins."""
    replaced = {(i, f) for i, f, _ in new}
    return [e for e in earlier if (e[0], e[1]) not in replaced]


def _default(s: Suspect, min_score: float | None, unlearned: dict) -> tuple[bool, str]:
    """(a default fix?, why not): the measured threshold of its kind, never for a task the run has not learned."""
    task = s.field
    if task in unlearned:
        return False, f"the run has not learned {task}: its suspects are more likely its own mistakes"
    kind = s.kind if s.kind in ("pair", "assignment", "photo") else task
    floor = min_score if min_score is not None else DEFAULT_MIN[kind]
    if floor is None:
        return False, {"assignment": "another 5/1/1 assignment than the incorrect/normal swap: such fixes were not "
                                     "measured right 90% of the time (BENCHMARKS §18), review it",
                       "age": "age fixes were not measured right 90% of the time (BENCHMARKS §18): review it"}.get(
            kind, "a single photo's mask against its person's 5/1/1 structure: review it" if s.note == "structure"
            else "judged per photo, whose fixes were not measured right 90% of the time: review it")
    if s.score < floor:
        return False, f"score {s.score:.3f} below the {floor:g} whose fixes were measured >= 90% right"
    return True, ""


def _not_judged(every: list[dict], usable: list[dict], ids: list[str]) -> list[str]:
    """What the audit cannot judge: people with no out-of-fold prediction, ids that are not unique."""
    out = []
    seen = set(ids)
    left = [r for r in usable if r["image_id"] not in seen]
    if left:
        out.append(f"{len(left)} photos of {people_of(left)} people have no out-of-fold prediction (made usable "
                   "only by the run's --label-fixes, they trained in every fold), so they are not judged")
    # (a repeated id's suspects are listed, never ticked)
    twice = sorted(_repeated_ids(every))
    if twice:
        out.append(f"{len(twice)} image ids name more than one photo in the manifest (first: {twice[0]!r}): a fix "
                   "of such an id would change every photo it names, so no fix of theirs is ticked")
    return out


def _repeated_ids(every: list[dict]) -> set[str]:
    counts: dict[str, int] = {}
    for r in every:
        counts[r["image_id"]] = counts.get(r["image_id"], 0) + 1
    return {i for i, n in counts.items() if n > 1}


def _cautions(people: int, unlearned: dict[str, tuple[float, float]], need: dict[str, float] | None = None) -> list[str]:
    """Why the suspects may be the model's mistakes rather than the labels': few people behind the
    predictions, or a task the run has not learned (per unit: photos for mask, people for gender and age)."""
    out = []
    if people < FEW_VAL_PEOPLE:
        out.append(f"the run holds {people} people: out-of-fold predictions from models trained on so few are "
                   "noisy, and so are the suspects; audit a run of more people")
    for name, (acc, base) in unlearned.items():
        unit = "photo" if name == "mask" else "person"
        out.append(f"{name}: the run's out-of-fold accuracy per {unit} {acc:.3f} is no better than always answering "
                   f"the most common given {name} label ({base:.3f}) by more than chance allows"
                   f"{' (it would need above ' + format(need[name], '.3f') + ')' if need and name in need else ''}, "
                   f"so its {name} suspects are more likely the model's mistakes than wrong labels: no {name} fix is "
                   "written; audit a run that has learned the task (more epochs, pretrained weights, more people)")
    return out


def _issues(labels: np.ndarray, p: np.ndarray, find_label_issues, quality_scores) -> tuple[np.ndarray, np.ndarray]:
    """(flagged, self-confidence quality) per example; a task whose labels hold one class has no issues
    cleanlab can find (it needs two classes to estimate the noise)."""
    import warnings

    quality = quality_scores(labels, p, method="self_confidence")
    if len(np.unique(labels)) < 2:
        return np.zeros(len(labels), bool), quality
    with warnings.catch_warnings():  # cleanlab warns of classes absent from a fold's labels: it still judges
        warnings.filterwarnings("ignore", category=UserWarning, module="cleanlab")
        flagged = find_label_issues(labels, p, filter_by="prune_by_noise_rate")
    return np.asarray(flagged, bool), quality


def _by_person(rows: list[dict]) -> dict[str, list[int]]:
    people: dict[str, list[int]] = {}
    for k, r in enumerate(rows):
        people.setdefault(person_key(r), []).append(k)
    return people


def _structure_of(rows: list[dict], ks: list[int]) -> list[int] | None:
    """The person's given mask labels when they are the competition's 5 wear, 1 incorrect, 1 normal."""
    given = [rows[k]["mask"] for k in ks]
    return given if tuple(given.count(m) for m in (WEAR, INCORRECT, NORMAL)) == STRUCTURE else None


def assignments(lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every way to give 7 photos the 5/1/1 structure: (pairs A x 2 of (incorrect photo, normal photo), their
    log-likelihoods A) under per-photo mask log-probabilities `lp` (7 x 3). 42 for 7 photos: exact."""
    n = len(lp)
    pairs = np.array([(i, j) for i in range(n) for j in range(n) if i != j])
    base = lp[:, WEAR].sum()
    ll = base - lp[pairs[:, 0], WEAR] - lp[pairs[:, 1], WEAR] + lp[pairs[:, 0], INCORRECT] + lp[pairs[:, 1], NORMAL]
    return pairs, ll


def best_assignment(pm: np.ndarray, given: list[int]) -> tuple[list[int], float]:
    """(the likeliest 5/1/1 labels of a person's photos, the posterior probability that `given` is wrong) from
    their mask probabilities `pm` (7 x 3), each assignment a priori equally likely."""
    lp = np.log(np.clip(np.asarray(pm, dtype=np.float64), 1e-300, None))
    pairs, ll = assignments(lp)
    post = np.exp(ll - ll.max())
    post /= post.sum()
    g = (given.index(INCORRECT), given.index(NORMAL))
    at = int(np.flatnonzero((pairs[:, 0] == g[0]) & (pairs[:, 1] == g[1]))[0])
    i, j = pairs[int(ll.argmax())]
    best = [WEAR] * len(given)
    best[i], best[j] = INCORRECT, NORMAL
    return best, float(1 - post[at])


def _mask_suspects(rows, pm, find_label_issues, quality_scores) -> list[Suspect]:
    names = L.MASK_NAMES
    labels = np.array([r["mask"] for r in rows])
    flagged, q = _issues(labels, pm, find_label_issues, quality_scores)
    out, explained = [], set()
    for person, ks in _by_person(rows).items():
        given = _structure_of(rows, ks)
        if given is None:
            continue
        explained |= set(ks)  # a structured person's photos are judged by the structure
        best, score = best_assignment(pm[ks], given)
        if best == given:
            continue
        changed = [(k, b) for k, b, g in zip(ks, best, given) if b != g]
        swap = len(changed) == 2 and {rows[k]["mask"] for k, _ in changed} == {INCORRECT, NORMAL} and \
            all(b == 3 - rows[k]["mask"] for k, b in changed)
        folder = _folder(rows[ks[0]])
        given_text = ", ".join(f"{_stem(rows[k])} labelled {names[rows[k]['mask']]}" for k, _ in changed)
        fix_text = ", ".join(f"{_stem(rows[k])} {names[b]}" for k, b in changed)
        out.append(Suspect("pair" if swap else "assignment", folder, "mask", given_text,
                           ("swap them: " if swap else "5/1/1 likelier as: ") + fix_text, score,
                           [rows[k]["image_id"] for k, _ in changed],
                           [(rows[k]["image_id"], "mask", str(b)) for k, b in changed]))
    for k in np.flatnonzero(flagged):
        r, s = rows[k], int(pm[k].argmax())
        if s == r["mask"]:
            continue
        if k in explained and any(rows[k]["image_id"] in x.photos for x in out):
            continue  # its person's assignment suspect already names it
        out.append(Suspect("photo", r["image_id"], "mask", names[r["mask"]], names[s], 1 - float(q[k]), [r["image_id"]],
                           [(r["image_id"], "mask", str(s))], note="structure" if k in explained else ""))
    return out


def _person_suspects(rows, p, task: str, old: int, find_label_issues, quality_scores) -> list[Suspect]:
    """Gender or age group per person: the mean of the person's photos' probabilities, judged once; age at
    the model's own boundary `old`, against the labels at that boundary."""
    names = L.age_names(old) if task == "age" else L.GENDER_NAMES
    people = _by_person(rows)
    keys = sorted(people)
    given = np.array([np.bincount([_given(rows[k], task, old) for k in people[key]]).argmax() for key in keys])
    mean = np.stack([p[people[key]].mean(0) for key in keys])
    mean = mean / mean.sum(1, keepdims=True)
    flagged, q = _issues(given, mean, find_label_issues, quality_scores)
    out = []
    for j in np.flatnonzero(flagged):
        key, s = keys[j], int(mean[j].argmax())
        if s == given[j]:
            continue
        ks = people[key]
        first = rows[ks[0]]
        if task == "age":
            age = _nearest_age(first["age"], s, old)
            value, given_text = str(age), f"{names[given[j]]} (age {first['age']})"
            suggested = f"{names[s]} (age {age} in label_fixes.csv: the nearest age of that group at --old {old})"
        else:
            value, given_text, suggested = L.GENDER_NAMES[s], names[given[j]], names[s]
        out.append(Suspect("person", _folder(first), task, given_text, suggested, 1 - float(q[j]),
                           [rows[k]["image_id"] for k in ks],
                           [(f"person:{key}", "gender" if task == "gender" else "age", value)]))
    return out


def _fix_targets(every: list[dict]):
    """fix → the label-fixes rows that change exactly its photos: a person's fix (`person:KEY`) becomes its
    folder where `--label-fixes` resolves that folder to this person's photos alone (the competition layout),
    else one row per photo (a generic layout's shared `images/` folder, ids without a folder)."""
    by_person: dict[str, list[str]] = {}
    by_folder: dict[str, set[str]] = {}
    for r in every:
        by_person.setdefault(person_key(r), []).append(r["image_id"])
        if "/" in r["image_id"]:
            by_folder.setdefault(r["image_id"].split("/")[0], set()).add(r["image_id"])
    ids = {r["image_id"] for r in every}

    def rows_of(fix: tuple[str, str, str]) -> list[tuple[str, str, str]]:
        who, fld, value = fix
        if not who.startswith("person:"):
            return [fix]
        photos = by_person[who[len("person:"):]]
        folders = {i.split("/")[0] for i in photos if "/" in i}
        if len(folders) == 1:
            (folder,) = folders
            if by_folder.get(folder) == set(photos) and folder not in ids:
                return [(folder, fld, value)]
        return [(i, fld, value) for i in photos]
    return rows_of


def _given(r: dict, task: str, old: int) -> int:
    return r["gender"] if task == "gender" else L.age_group(r["age"], old)


def _nearest_age(age: int, group: int, old: int) -> int:
    """The age of `group` (0: < 30, 1: 30..old-1, 2: >= old) nearest `age`: the smallest change of label."""
    lo, hi = [(0, L.YOUNG - 1), (L.YOUNG, old - 1), (old, 120)][group]
    return min(max(int(age), lo), hi)


def _folder(r: dict) -> str:
    """The person's folder name (what `--label-fixes` takes for every photo of a person)."""
    return r["image_id"].split("/")[0] if "/" in r["image_id"] else (r["person_id"] or r["image_id"])


def _stem(r: dict) -> str:
    return r["image_id"].rsplit("/", 1)[-1]


def _write_suspects(path: Path, suspects: list[Suspect]) -> None:
    rundir.write_csv(path, ["rank", "kind", "id", "field", "given", "suggested", "score", "default", "fixes", "note",
                            "photos"],
                     [[k, s.kind, s.id, s.field, s.given, s.suggested, f"{s.score:.6f}", int(s.default),
                       ";".join(f"{i}|{f}|{v}" for i, f, v in s.fixes), s.note, " ".join(s.photos)]
                      for k, s in enumerate(suspects, start=1)])


def _why(s: Suspect) -> str:
    return {"structure": "a single photo's mask against its person's 5/1/1 structure: review it"}.get(s.note, s.note)


def read_suspects(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _page(out: Path, crops: Path, rows: dict, suspects: list[Suspect], photos: int, people: int, run: Path,
          cautions: list[str], not_judged: list[str], structured: int, old: int,
          earlier: tuple[Path | None, list[tuple]] = (None, [])) -> None:
    """index.html: each suspect's crops, given and suggested labels, a tick per suspect (ticked: the default
    fixes, those in label_fixes.csv), and a button that downloads the ticked suspects' fixes as a label-fixes CSV,
    after the run's own fixes (`earlier`: its --label-fixes file and rows) that no ticked fix replaces."""
    src, rows_before = earlier
    carried = (f"<p>This run trained with the {len(rows_before)} fixes of {html.escape(str(src))}; the labels above are "
               f"those fixed ones. label_fixes.csv and the download keep its rows, but a new fix of the same photo "
               f"(or person) and field replaces its row, so the file applies to the crops as cropped: train with it "
               f"alone.</p>" if src else "")
    shown = suspects[:PAGE_LIMIT]
    pics = out / "photos"
    shutil.rmtree(pics, ignore_errors=True)
    pics.mkdir()
    names: dict[str, str] = {}
    for s in shown:
        for iid in s.photos:
            if iid not in names:
                names[iid] = f"photos/{len(names):05d}{Path(rows[iid]['crop']).suffix or '.jpg'}"
                shutil.copyfile(crops / rows[iid]["crop"], out / names[iid])
    cards = []
    for k, s in enumerate(shown):
        imgs = "".join(f"<figure><img src='{names[i]}' alt='{html.escape(i)}'><figcaption>{html.escape(_stem(rows[i]))}"
                       f"</figcaption></figure>" for i in s.photos)
        fixes = html.escape(json.dumps(s.fixes))
        why = f" <i>Not ticked: {html.escape(_why(s))}.</i>" if not s.default else ""
        cards.append(f"<section><label><input type='checkbox' data-fixes=\"{fixes}\"{' checked' if s.default else ''}> "
                     f"<b>#{k + 1} {html.escape(s.field)}</b> of {html.escape(s.id)}: given <b>{html.escape(s.given)}</b>, "
                     f"suggested <b>{html.escape(s.suggested)}</b> (score {s.score:.3f})</label>{why}"
                     f"<div class='photos'>{imgs}</div></section>")
    more = (f"<p>The first {PAGE_LIMIT} of {len(suspects)} suspects; all of them: <a href='suspects.csv'>suspects.csv</a>.</p>"
            if len(suspects) > PAGE_LIMIT else "")
    page = f"""<!doctype html><html lang='en'><head><meta charset='utf-8'><title>maskcls audit</title>
<link rel='icon' href='data:,'><style>
body{{font-family:system-ui,sans-serif;max-width:1200px;margin:auto;padding:1em;color:#222}}
section{{border-bottom:1px solid #ddd;padding:.6em 0}}.photos{{display:flex;flex-wrap:wrap;gap:.4em;margin-top:.4em}}
figure{{margin:0;text-align:center;font-size:.8em}}img{{width:112px;height:112px;object-fit:cover;border:1px solid #ccc}}
button{{font-size:1em}}.caution{{color:#b03a2e}}</style></head><body>
<h1>maskcls audit</h1>
{''.join(f"<p class='caution'>Caution: {html.escape(c)}.</p>" for c in cautions)}
{''.join(f"<p class='caution'>Not judged: {html.escape(c)}.</p>" for c in not_judged)}
<p>{len(suspects)} suspect labels among {photos} photos of {people} people of {html.escape(str(run))}, judged by
out-of-fold predictions. Mask: {structured} of {people} people have the competition's 5 wear / 1 incorrect / 1 normal
photos and are judged as a whole (the likeliest of the 42 ways to give their photos that structure); the others
are judged photo by photo (confident learning, cleanlab), whose fixes are never ticked. Gender and age: per
person, age at the model's boundary {old}. Ticked: the {sum(s.default for s in suspects)} suspects of the kinds and
scores whose fixes were measured right at least 90% of the time (those in <a href='label_fixes.csv'>label_fixes.csv</a>);
each other one says why not. Look at each; untick what the photos do not bear out, tick what they do, then
<button id='save' type='button'>download the ticked fixes</button> and train with
<code>maskcls train CROPS --label-fixes label_fixes.csv</code>. Numbers: <a href='suspects.csv'>suspects.csv</a>.</p>
{carried}{more}{''.join(cards) or '<p>No suspect: every given label agrees with the out-of-fold predictions.</p>'}
<script type="application/json" id="earlier">{_json_script(rows_before)}</script>
<script>
"use strict";
document.getElementById("save").addEventListener("click", () => {{
  const rows = [];
  for (const box of document.querySelectorAll("input[data-fixes]:checked")) rows.push(...JSON.parse(box.dataset.fixes));
  const replaced = new Set(rows.map(([id, f]) => id + "\\u0000" + f));
  const earlier = JSON.parse(document.getElementById("earlier").textContent).filter(([id, f]) => !replaced.has(id + "\\u0000" + f));
  const lines = ["image_id,field,value"];
  for (const [id, f, v] of earlier.concat(rows)) lines.push([id, f, v].map(x => /[",\\n]/.test(x) ? '"' + x.replace(/"/g, '""') + '"' : x).join(","));
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([lines.join("\\n") + "\\n"], {{type: "text/csv"}}));
  a.download = "label_fixes.csv"; a.click();
}});
</script></body></html>"""
    atomic_write_bytes(out / "index.html", page.encode("utf-8"))
