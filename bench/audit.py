"""How right are `maskcls audit`'s fixes? Precision and recall of label_fixes.csv at the defaults, and the
precision of every kind of suspect per score, on workloads whose classes are visible (bench/workload.py
`make_visible_workload`: real faces, drawn masks; gender and age those of the source face) with label noise
made on purpose: a share of the persons get their incorrect_mask and normal photos' mask labels swapped, and
5% of the persons (others) get the other gender.

    python bench/audit.py [--workloads 60:0,90:3] [--rates 0.05,0.10,0.20] [--gender-rate 0.05] [--folds 3]
                          [--epochs 4] [--img-size 96] [--weak] [--boundary] [--rounds N] [--groups] [--workdir DIR]

Per workload (people:seed) and swap rate: a k-fold run on the noisy labels (mobilenet_v2 from torchvision's
ImageNet file, as bench/finetune.py; seed 42), then `audit` of it judging by each fold's best epoch and by its
last. A fix row is right when it gives the photo (or the person's photos) its true label. Reported: the rows of
label_fixes.csv right / rows (precision) and the swapped photos and flipped people given back their true label
(recall); and per kind of suspect, the precision of its fixes at score thresholds (what DEFAULT_MIN is chosen
from). `--weak`: 24 people, 2 swapped, 1 gender flipped, 4 folds x 3 epochs from random weights (a run that
learned little). `--boundary`: a `--old 58 --val-old 60` k-fold run on right labels, whose audit must suggest no
age fix. `--groups`: the k-fold keeps each source human's persons in one fold (`train --groups`, the
workload's groups.csv), so out-of-fold is out-of-identity. Results in DIR/audit_bench.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from finetune import hub_with_mobilenet  # noqa: E402
from workload import make_visible_workload, workdir  # noqa: E402

from tests.synth import swap_incorrect_and_normal as swap  # noqa: E402

THRESHOLDS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def flip_gender(crops: Path, persons) -> None:
    from preprocess import labels as L
    from preprocess.manifest import read_manifest, read_meta, write_manifest

    rows = read_manifest(crops)
    for r in rows:
        if r["person_id"] in persons:
            r["gender"] = 1 - r["gender"]
            r["label"] = L.encode(r["mask"], r["gender"], r["age_group"])
    write_manifest(crops, rows, read_meta(crops))


def truth_of(clean: Path, old: int) -> dict[str, dict]:
    from preprocess import labels as L
    from preprocess.manifest import read_manifest

    return {r["image_id"]: {"mask": r["mask"], "gender": r["gender"], "group": L.age_group(r["age"], old),
                            "person": r["person_id"]} for r in read_manifest(clean)}


def fix_right(image_id: str, fld: str, value: str, truth: dict, folders: dict, old: int) -> bool:
    """Whether a label-fixes row gives every photo it names its true label."""
    from preprocess import labels as L

    photos = folders.get(image_id, [image_id])
    for p in photos:
        t = truth[p]
        if fld == "mask" and t["mask"] != int(value):
            return False
        if fld == "gender" and t["gender"] != (L.GENDERS[value] if value in L.GENDERS else int(value)):
            return False
        if fld == "age" and t["group"] != L.age_group(int(value), old):
            return False
    return True


def judge(audit_dir: Path, truth: dict, old: int, swapped: set, flipped: set) -> dict:
    with open(audit_dir / "label_fixes.csv", newline="") as f:
        fixes = list(csv.DictReader(f))
    with open(audit_dir / "suspects.csv", newline="") as f:
        suspects = list(csv.DictReader(f))
    folders: dict[str, list[str]] = {}
    for i in truth:
        folders.setdefault(i.split("/")[0], []).append(i)
    right = [fix_right(f["image_id"], f["field"], f["value"], truth, folders, old) for f in fixes]
    fixed_photos = {f["image_id"] for f, ok in zip(fixes, right) if ok and f["field"] == "mask"}
    swapped_photos = {i for i, t in truth.items() if t["person"] in swapped and t["mask"] in (1, 2)}
    fixed_people = {f["image_id"].split("/")[0] for f, ok in zip(fixes, right) if ok and f["field"] == "gender"}
    flipped_folders = {i.split("/")[0] for i, t in truth.items() if t["person"] in flipped}
    per_kind: dict[str, list[tuple[float, bool]]] = {}
    for s in suspects:
        rows = [x.split("|") for x in s["fixes"].split(";") if x]
        ok = bool(rows) and all(fix_right(i, f, v, truth, folders, old) for i, f, v in rows)
        kind = s["kind"] if s["kind"] != "person" else s["field"]
        per_kind.setdefault(kind, []).append((float(s["score"]), ok))
    sweep = {k: {t: [sum(ok for sc, ok in v if sc >= t), sum(sc >= t for sc, _ in v)] for t in THRESHOLDS}
             for k, v in per_kind.items()}
    return {"fix_rows": len(fixes), "fix_rows_right": int(sum(right)),
            "swapped_photos": len(swapped_photos), "swapped_photos_fixed": len(fixed_photos & swapped_photos),
            "flipped_people": len(flipped_folders), "flipped_people_fixed": len(fixed_people & flipped_folders),
            "suspects": len(suspects), "sweep": sweep}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="60:0,90:3")
    ap.add_argument("--rates", default="0.05,0.10,0.20")
    ap.add_argument("--gender-rate", type=float, default=0.05)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--img-size", type=int, default=96)
    ap.add_argument("--weak", action="store_true")
    ap.add_argument("--boundary", action="store_true")
    ap.add_argument("--only-extra", action="store_true", help="run --weak/--boundary alone")
    ap.add_argument("--retrain", action="store_true", help="train again where DIR holds the k-fold run already")
    ap.add_argument("--rounds", type=int, default=1, help="audit rounds: round r trains the k-fold with round "
                    "r-1's label_fixes.csv (which keeps that round's fixes) and audits it; judged on its file")
    ap.add_argument("--groups", action="store_true",
                    help="train the k-fold with --groups (the workload's groups.csv): a human's persons in one fold, "
                         "so the out-of-fold predictions are out-of-identity, as the competition's distinct people are")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    base = workdir(args.workdir)
    hub_with_mobilenet(base)
    from classify.study.audit import audit
    from classify.training.train import TrainConfig, fit
    from preprocess import CropConfig, crop_dataset
    from preprocess.manifest import read_manifest

    common = dict(model="mobilenet_v2", weights="imagenet", epochs=args.epochs, img_size=args.img_size, seed=42,
                  device="cpu", folds=args.folds, fold="all")
    results = []
    out_json = base / "audit_bench.json"

    def clean_crops(people: int, seed: int) -> Path:
        clean = base / f"clean_{people}_{seed}"
        raw = make_visible_workload(base / f"visible_{people}_{seed}", people, seed=seed)
        if not (clean / "manifest.csv").is_file():
            crop_dataset(raw, clean, CropConfig(size=128, device="cpu"))
        return clean

    def grouped(cfg: dict, clean: Path) -> dict:
        return cfg | {"groups": str(clean.parent / clean.name.replace("clean_", "visible_") / "groups.csv")} \
            if args.groups else cfg

    def one(name: str, clean: Path, rate: float, gender_rate: float, cfg: dict, n_swap: int | None = None,
            n_flip: int | None = None) -> None:
        persons = sorted({r["person_id"] for r in read_manifest(clean)})
        rng = np.random.default_rng(int(rate * 1000) + 1)
        order = rng.permutation(persons).tolist()
        k_swap = n_swap if n_swap is not None else round(rate * len(persons))
        k_flip = n_flip if n_flip is not None else round(gender_rate * len(persons))
        swapped, flipped = set(order[:k_swap]), set(order[k_swap:k_swap + k_flip])
        noisy = base / f"noisy_{name}"
        shutil.rmtree(noisy, ignore_errors=True)
        shutil.copytree(clean, noisy)
        swap(noisy, swapped)
        flip_gender(noisy, flipped)
        t = time.perf_counter()
        run = base / f"k_{name}"
        done = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        same = done.get("oof") and json.loads((run / "config.json").read_text()).get("crops") == str(noisy)
        summary = done if same and not args.retrain else \
            fit(TrainConfig(crops=str(noisy), out=str(run), **cfg), warn=lambda m: None, overwrite=True)
        secs = time.perf_counter() - t
        old = cfg.get("old", 60)
        truth = truth_of(clean, old)
        res = {"name": name, "people": len(persons), "swapped": k_swap, "flipped": k_flip,
               "oof_f1": round(summary["oof"]["f1"], 4), "oof_mask_f1": round(summary["oof"]["mask_f1"], 4),
               "oof_gender_f1": round(summary["oof"]["gender_f1"], 4), "seconds_kfold": round(secs)}
        for epoch in ("best", "last"):
            a = audit(run, base / f"audit_{name}_{epoch}", epoch=epoch)
            res[epoch] = judge(base / f"audit_{name}_{epoch}", truth, old, swapped, flipped) | {"cautions": a.cautions}
        b = res["best"]
        print(f"{name}: oof F1 {res['oof_f1']}, fixes {b['fix_rows_right']}/{b['fix_rows']} right, swapped photos "
              f"{b['swapped_photos_fixed']}/{b['swapped_photos']}, flipped {b['flipped_people_fixed']}/"
              f"{b['flipped_people']}; last epoch: {res['last']['fix_rows_right']}/{res['last']['fix_rows']}, "
              f"{res['last']['swapped_photos_fixed']}/{res['last']['swapped_photos']} ({secs:.0f} s)", flush=True)
        prev = base / f"audit_{name}_best"
        for r in range(2, args.rounds + 1):  # train the k-fold again with the last round's fixes, audit again
            t = time.perf_counter()
            fit(TrainConfig(crops=str(noisy), out=str(base / f"k_{name}_r{r}"), label_fixes=str(prev / "label_fixes.csv"),
                            **cfg), warn=lambda m: None, overwrite=True)
            a = audit(base / f"k_{name}_r{r}", base / f"audit_{name}_r{r}")
            prev = base / f"audit_{name}_r{r}"
            res[f"round{r}"] = judge(prev, truth, old, swapped, flipped) | {"cautions": a.cautions, "carried": a.carried,
                                                                         "seconds_kfold": round(time.perf_counter() - t)}
            q = res[f"round{r}"]
            print(f"{name} round {r}: fixes {q['fix_rows_right']}/{q['fix_rows']} right ({a.carried} carried from the "
                  f"round before), swapped photos {q['swapped_photos_fixed']}/{q['swapped_photos']}, flipped "
                  f"{q['flipped_people_fixed']}/{q['flipped_people']}", flush=True)
        results.append(res)
        out_json.write_text(json.dumps(results, indent=1))

    if not args.only_extra:
        for spec in args.workloads.split(","):
            people, seed = map(int, spec.split(":"))
            clean = clean_crops(people, seed)
            for rate in map(float, args.rates.split(",")):
                one(f"{people}_{seed}_{rate:g}" + ("_g" if args.groups else ""), clean, rate, args.gender_rate,
                    grouped(common, clean))
    if args.weak:
        clean = clean_crops(24, 9)
        one("weak", clean, 0.0, 0.0, grouped(common, clean) | dict(weights="none", epochs=3, folds=4), n_swap=2, n_flip=1)
    if args.boundary:
        clean = clean_crops(60, 0)
        one("boundary", clean, 0.0, 0.0, grouped(common, clean) | dict(old=58, val_old=60))
    out_json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
