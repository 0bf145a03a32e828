"""Calibration and Grad-CAM on a workload whose classes are visible (bench/workload.py
`make_visible_workload`: real faces with drawn masks), for two workload seeds.

    python bench/calibration.py [--people 40] [--test-people 30] [--epochs 5] [--seeds 0,1] [--workdir DIR]

Per seed: mobilenet_v2 with ImageNet weights trained on `--people` people (20% validation, which fits
the temperature); then, on held-out people that neither training nor the temperature saw, the expected
calibration error (15 bins, top class) of the raw and the calibrated probabilities, and the mean share
of the mask task's Grad-CAM map in the lower half of the face box over the masked photos, for the trained
model and for the same architecture with its weights re-drawn at random.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from finetune import hub_with_mobilenet  # noqa: E402
from workload import make_visible_workload, workdir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--people", type=int, default=40)
    ap.add_argument("--test-people", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    base = workdir(args.workdir)
    hub_with_mobilenet(base)
    import numpy as np
    import torch

    from classify.inference.calibration import apply_temperature, ece
    from classify.checkpoint import load_checkpoint
    from classify.training.config import TrainConfig
    from classify.data.dataset import load_rows
    from classify.study.explain import explain_crops
    from classify.models.nets import create_model
    from classify.inference.predictor import predict
    from classify.inference.card import card_of
    from classify.training.train import fit
    from preprocess import CropConfig, crop_dataset

    results = {}
    for seed in map(int, args.seeds.split(",")):
        crops, test = base / f"crops{seed}", base / f"test{seed}"
        crop_dataset(make_visible_workload(base / f"train{seed}", args.people, seed=seed), crops, CropConfig(size=160, device="cpu"))
        crop_dataset(make_visible_workload(base / f"held{seed}", args.test_people, seed=700 + seed), test,
                     CropConfig(size=160, device="cpu"))
        run = base / f"run{seed}"
        s = fit(TrainConfig(crops=str(crops), out=str(run), model="mobilenet_v2", weights="imagenet", epochs=args.epochs,
                            img_size=args.img_size, device="cpu", seed=seed), warn=lambda m: None, overwrite=True)
        raw = predict([run], test, None, device="cpu", calibrate=False)
        t = s["calibration"]["temperature"]
        y = np.array([r["label"] for r in raw.rows])
        ok = y >= 0
        ckpt = load_checkpoint(run / "best.pt")
        rows = [r for r in load_rows(test)[1] if r["mask"] in (0, 1)][:60]
        shares = {}
        for name, state in (("trained", ckpt["model_state"]), ("random", None)):
            c = dict(ckpt)
            if state is None:
                torch.manual_seed(seed)
                spec = card_of(ckpt)
                c["model_state"] = create_model(spec.name, weights="none", **spec.kwargs).state_dict()
            explain_crops(c, test, rows, base / f"cam{seed}-{name}", name)
            with open(base / f"cam{seed}-{name}" / "gradcam.csv") as f:
                import csv
                mask = [float(r["lower_face_share"]) for r in csv.DictReader(f) if r["task"] == "mask"]
            shares[name] = round(float(np.mean(mask)), 4)
        results[seed] = {"temperature": round(t, 3),
                         "validation_ece": {"before": round(s["calibration"]["ece_before"], 4),
                                            "after": round(s["calibration"]["ece_after"], 4)},
                         "held_out_ece": {"before": round(ece(raw.probs[ok], y[ok]), 4),
                                          "after": round(ece(apply_temperature(raw.probs[ok], t), y[ok]), 4)},
                         "held_out_photos": int(ok.sum()), "val_f1": round(s["best"]["val_f1"], 4),
                         "mask_map_lower_face_share": shares, "masked_photos_explained": len(rows)}
        print(json.dumps({seed: results[seed]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
