"""`maskcls audit RUN --out DIR`: the training labels most likely wrong, found by confident learning
(cleanlab: Northcutt et al., "Confident Learning: Estimating Uncertainty in Dataset Labels", JAIR 2021)
over a k-fold run's out-of-fold predictions, so that no photo is judged by a model that trained on it.

Per task, the way the competition gives labels:
- **mask, per photo**, with the competition's structure: each person has one `incorrect_mask` and one
  `normal` photo, so their swap (the known error of this data set) shows as a pair, and a pair is one
  suspect. A pair is a swap suspect when confident learning flags one of its photos and the model
  prefers the swapped labels (p_i(normal) p_n(incorrect) > p_i(incorrect) p_n(normal)); any other
  flagged photo is a photo suspect.
- **gender and age group, per person**: every photo of a person shares them, so the person's photos
  are aggregated (the mean of their task probabilities) before judging, and the person is the suspect.

The probabilities are the run's out-of-fold logits (each fold's val_logits.npz, full precision) under
its temperature, summed into each task's marginal (`answer.task_marginals`, as serve's task values).
cleanlab flags a label issue where the model's confident prediction disagrees with the given label
(`find_label_issues`, prune by noise rate, per-class thresholds: a rare class is not judged against a
frequent one's confidence), and ranks by self-confidence: the probability of the given label. A
suspect's `score` is 1 - that probability (a pair: 1 - the geometric mean of its two photos'), so the
most suspect come first.

Writes `suspects.csv` (every suspect, most suspect first), `label_fixes.csv` (the suspects with score
>= `min_score`, in `train --label-fixes` format: `image_id,field,value`; an age-group suggestion is
written as the nearest age of the suggested group), and `index.html` (each suspect's crops with the
given and suggested labels, a tick per fix, and a button that downloads the ticked fixes).
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
from classify.metrics import FEW_VAL_PEOPLE
from classify.inference import rundir
from classify.inference.answer import task_marginals
from classify.inference.calibration import apply_temperature

MIN_SCORE = 0.5     # label_fixes.csv: the suspects whose given label has out-of-fold probability <= 0.5
PAGE_LIMIT = 300    # suspects shown on index.html (all of them are in suspects.csv)


@dataclass
class Suspect:
    kind: str           # "pair" (mask swap), "photo" (mask), "person" (gender or age)
    id: str             # the image id (photo) or the person folder (pair, person)
    field: str          # mask, gender, age
    given: str
    suggested: str
    score: float
    photos: list[str]   # the image ids the page shows
    fixes: list[tuple[str, str, str]] = field(default_factory=list)  # (image_id, field, value) rows


@dataclass
class AuditResult:
    suspects: list[Suspect]
    fixes: int                # rows of label_fixes.csv
    photos: int               # photos judged
    people: int
    out: Path
    cautions: list[str] = field(default_factory=list)  # why the suspects may say more about the model than the labels


def _cleanlab():
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise ConfigError("maskcls audit needs cleanlab: pip install 'maskcls[audit]'") from None
    return find_label_issues, get_label_quality_scores


def out_of_fold(run: Path) -> tuple[list[str], np.ndarray, dict]:
    """(image ids, calibrated probabilities N x 18, the run's config) of a k-fold run's out-of-fold photos."""
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
    missing = [f.name for f in folds if not (f / rundir.VAL_LOGITS).is_file()]
    missing += [f"fold{k}" for k in range(len(folds), int(config.get("folds") or 0))]
    if missing:
        raise ConfigError(f"{run}: the k-fold run has not finished ({', '.join(missing)} without validation "
                          f"logits); finish it with `maskcls train --resume --out {run}`")
    t = float((rundir.read_summary(run).get("calibration") or {}).get("temperature", 1.0))
    ids, probs = [], []
    for f in folds:
        i, z, _ = rundir.read_val_logits(f)
        ids += i
        probs.append(apply_temperature(z, t))
    return ids, np.concatenate(probs), config


def audit(run: Path, out: Path, min_score: float = MIN_SCORE, crops: Path | None = None) -> AuditResult:
    """Find the suspect labels of a k-fold run's training photos; write suspects.csv, label_fixes.csv and
    index.html into `out`.

    >>> audit(Path("runs/k5"), Path("runs/k5-audit"))   # then: maskcls train CROPS --label-fixes runs/k5-audit/label_fixes.csv
    """
    if not 0 <= min_score <= 1:
        raise ConfigError(f"--min-score {min_score}: must be in [0, 1] (1 - the probability of the given label)")
    find_label_issues, quality_scores = _cleanlab()
    ids, probs, config = out_of_fold(run)
    if crops is not None and not (Path(crops) / "manifest.csv").is_file():
        raise ConfigError(f"--crops {crops}: not a crops folder (no manifest.csv); give the folder the run trained on")
    crops = Path(crops or config["crops"])
    if not (crops / "manifest.csv").is_file():
        raise ConfigError(f"{crops}: the run's crops folder is not there (give it with --crops)")
    val_old = int(config.get("val_old") or L.DEFAULT_OLD)
    fixes = Path(config["label_fixes"]) if config.get("label_fixes") else None
    rows = {r["image_id"]: r for r in load_rows(crops, val_old, fixes)[0]}  # the labels the run trained on
    unknown = [i for i in ids if i not in rows]
    if unknown:
        raise ConfigError(f"{crops}/manifest.csv has no photo {unknown[0]!r} of the run's out-of-fold predictions "
                          f"({len(unknown)} in all): is it the crops folder the run trained on?")
    rows = [rows[i] for i in ids]
    task = task_marginals(probs)
    suspects = _mask_suspects(rows, task["mask"], find_label_issues, quality_scores)
    for name in ("gender", "age"):
        suspects += _person_suspects(rows, task[name], name, val_old, find_label_issues, quality_scores)
    suspects.sort(key=lambda s: (-s.score, s.id, s.field))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_suspects(out / "suspects.csv", suspects)
    chosen = [s for s in suspects if s.score >= min_score]
    rundir.write_csv(out / "label_fixes.csv", ["image_id", "field", "value"], [list(f) for s in chosen for f in s.fixes])
    people = people_of(rows)
    cautions = _cautions(rows, task, people, val_old)
    _page(out, crops, {r["image_id"]: r for r in rows}, suspects, min_score, len(rows), people, Path(run), cautions)
    return AuditResult(suspects, sum(len(s.fixes) for s in chosen), len(rows), people, out, cautions)


def _cautions(rows: list[dict], task: dict[str, np.ndarray], people: int, val_old: int) -> list[str]:
    """Why the suspects may be the model's mistakes rather than the labels': few people behind the
    predictions, or a task the run has not learned (its out-of-fold accuracy no better than always
    answering the task's most common given label)."""
    out = []
    if people < FEW_VAL_PEOPLE:
        out.append(f"the run holds {people} people: out-of-fold predictions from models trained on so few are "
                   "noisy, and so are the suspects; audit a run of more people")
    for name, p in task.items():
        given = np.array([r["mask"] if name == "mask" else _given(r, name, val_old) for r in rows])
        counts = np.bincount(given)
        if (counts > 0).sum() < 2:  # one class given: nothing to learn, nothing cleanlab can flag
            continue
        acc, base = float((p.argmax(1) == given).mean()), float(counts.max() / len(given))
        if acc <= base:
            out.append(f"{name}: the run's out-of-fold accuracy {acc:.3f} is no better than always answering the "
                       f"most common given {name} label ({base:.3f}), so its {name} suspects are more likely the "
                       "model's mistakes than wrong labels; audit a run that has learned the task (more epochs, "
                       "pretrained weights, more people)")
    return out


def _issues(labels: np.ndarray, p: np.ndarray, find_label_issues, quality_scores) -> tuple[np.ndarray, np.ndarray]:
    """(flagged, self-confidence quality) per example; a task whose labels hold one class has no issues
    cleanlab can find (it needs two classes to estimate the noise)."""
    quality = quality_scores(labels, p, method="self_confidence")
    if len(np.unique(labels)) < 2:
        return np.zeros(len(labels), bool), quality
    flagged = find_label_issues(labels, p, filter_by="prune_by_noise_rate")
    return np.asarray(flagged, bool), quality


def _mask_suspects(rows, pm, find_label_issues, quality_scores) -> list[Suspect]:
    names = L.MASK_NAMES
    labels = np.array([r["mask"] for r in rows])
    flagged, q = _issues(labels, pm, find_label_issues, quality_scores)
    by_person: dict[str, dict[int, list[int]]] = {}
    for k, r in enumerate(rows):
        by_person.setdefault(person_key(r), {}).setdefault(r["mask"], []).append(k)
    out, done = [], set()
    for person, kinds in by_person.items():
        inc, nor = kinds.get(1, []), kinds.get(2, [])
        if len(inc) != 1 or len(nor) != 1:
            continue
        i, n = inc[0], nor[0]
        if (flagged[i] or flagged[n]) and pm[i, 2] * pm[n, 1] > pm[i, 1] * pm[n, 2]:
            done |= {i, n}
            folder = _folder(rows[i])
            out.append(Suspect("pair", folder, "mask",
                               f"{_stem(rows[i])} labelled {names[1]}, {_stem(rows[n])} labelled {names[2]}",
                               f"swap them: {_stem(rows[i])} {names[2]}, {_stem(rows[n])} {names[1]}",
                               1 - math.sqrt(max(q[i], 0) * max(q[n], 0)), [rows[i]["image_id"], rows[n]["image_id"]],
                               [(rows[i]["image_id"], "mask", "2"), (rows[n]["image_id"], "mask", "1")]))
    for k in np.flatnonzero(flagged):
        if k in done:
            continue
        r, s = rows[k], int(pm[k].argmax())
        if s == r["mask"]:
            continue
        out.append(Suspect("photo", r["image_id"], "mask", names[r["mask"]], names[s], 1 - float(q[k]), [r["image_id"]],
                           [(r["image_id"], "mask", str(s))]))
    return out


def _person_suspects(rows, p, task: str, val_old: int, find_label_issues, quality_scores) -> list[Suspect]:
    """Gender or age group per person: the mean of the person's photos' probabilities, judged once."""
    names = L.age_names(val_old) if task == "age" else L.GENDER_NAMES
    people: dict[str, list[int]] = {}
    for k, r in enumerate(rows):
        people.setdefault(person_key(r), []).append(k)
    keys = sorted(people)
    given = np.array([np.bincount([_given(rows[k], task, val_old) for k in people[key]]).argmax() for key in keys])
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
            age = _nearest_age(first["age"], s, val_old)
            value, given_text = str(age), f"{names[given[j]]} (age {first['age']})"
            suggested = f"{names[s]} (age {age} in label_fixes.csv: the nearest age of that group)"
        else:
            value, given_text, suggested = L.GENDER_NAMES[s], names[given[j]], names[s]
        folder = _folder(first)
        out.append(Suspect("person", folder, task, given_text, suggested, 1 - float(q[j]),
                           [rows[k]["image_id"] for k in ks], [(folder, "gender" if task == "gender" else "age", value)]))
    return out


def _given(r: dict, task: str, val_old: int) -> int:
    return r["gender"] if task == "gender" else L.age_group(r["age"], val_old)


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
    rundir.write_csv(path, ["rank", "kind", "id", "field", "given", "suggested", "score", "photos"],
                     [[k, s.kind, s.id, s.field, s.given, s.suggested, f"{s.score:.6f}", " ".join(s.photos)]
                      for k, s in enumerate(suspects, start=1)])


def read_suspects(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _page(out: Path, crops: Path, rows: dict, suspects: list[Suspect], min_score: float, photos: int, people: int,
          run: Path, cautions: list[str]) -> None:
    """index.html: each suspect's crops, given and suggested labels, a tick per suspect (ticked: those in
    label_fixes.csv), and a button that downloads the ticked suspects' fixes as a label-fixes CSV."""
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
        cards.append(f"<section><label><input type='checkbox' data-fixes=\"{fixes}\"{' checked' if s.score >= min_score else ''}> "
                     f"<b>#{k + 1} {html.escape(s.field)}</b> of {html.escape(s.id)}: given <b>{html.escape(s.given)}</b>, "
                     f"suggested <b>{html.escape(s.suggested)}</b> (score {s.score:.3f})</label>"
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
<p>{len(suspects)} suspect labels among {photos} photos of {people} people of {html.escape(str(run))}, judged by
out-of-fold predictions (confident learning, cleanlab). Ticked: the {sum(s.score >= min_score for s in suspects)}
suspects with score &ge; {min_score} (those in <a href='label_fixes.csv'>label_fixes.csv</a>). Look at each; untick
what the photos do not bear out, then <button id='save' type='button'>download the ticked fixes</button> and train with
<code>maskcls train CROPS --label-fixes label_fixes.csv</code>. Numbers: <a href='suspects.csv'>suspects.csv</a>.</p>
{more}{''.join(cards) or '<p>No suspect: every given label agrees with the out-of-fold predictions.</p>'}
<script>
"use strict";
document.getElementById("save").addEventListener("click", () => {{
  const lines = ["image_id,field,value"];
  for (const box of document.querySelectorAll("input[data-fixes]:checked"))
    for (const [id, f, v] of JSON.parse(box.dataset.fixes)) lines.push([id, f, v].map(x => /[",\\n]/.test(x) ? '"' + x.replace(/"/g, '""') + '"' : x).join(","));
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([lines.join("\\n") + "\\n"], {{type: "text/csv"}}));
  a.download = "label_fixes.csv"; a.click();
}});
</script></body></html>"""
    atomic_write_bytes(out / "index.html", page.encode("utf-8"))
