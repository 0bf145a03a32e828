"""Where a loss that grows becomes a run that diverged: the rule `epoch.DIVERGE_FACTOR` is chosen from this.

    python bench/divergence.py [--epochs 3] [--people 36] [--workdir DIR]

Trains resnet18 (32 px, from scratch) on synthetic crops whose classes are visible (tests/conftest.py
`make_crops`) with every --loss at learning rates from 1e-4 to 1e6, with the divergence rule switched off,
and prints per run the highest step loss over the run's first step's loss (the ratio the rule reads), the final training loss and the best validation F1. A rule leaves healthy runs alone where their
peak ratio stays well below the factor, and stops diverging ones long before their loss overflows.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from workload import workdir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--people", type=int, default=36)
    ap.add_argument("--lrs", default="1e-4,1e-3,1e-2,0.1,1,10,1e6")
    ap.add_argument("--losses", default="ce,wce,smooth,focal,f1")
    ap.add_argument("--mix", default="none,cutmix")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    base = workdir(args.workdir)

    from classify.errors import TrainingError
    from classify.training import epoch as E
    from classify.training.config import TrainConfig
    from classify.training.train import fit
    from tests.conftest import make_crops

    crops = base / "crops"
    if not (crops / "manifest.csv").is_file():
        make_crops(crops, people=args.people, size=48)
    E.DIVERGE_FACTOR = math.inf  # measure: nothing stops on growth
    seen: list[float] = []
    check = E._LossGuard.check

    def record(self, t, loss, epoch, step):
        seen.append(float(loss.detach()))
        return check(self, t, loss, epoch, step)

    E._LossGuard.check = record
    rows = []
    for mix in args.mix.split(","):
        for loss in args.losses.split(","):
            for lr in map(float, args.lrs.split(",")):
                seen.clear()
                out = base / f"run-{mix}-{loss}-{lr:g}"
                cfg = TrainConfig(crops=str(crops), out=str(out), model="resnet18", img_size=32, epochs=args.epochs,
                                  workers=0, weights="none", device="cpu", preset="none", loss=loss, lr=lr, mix=mix,
                                  batch_size=32)
                stopped = ""
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        summary = fit(cfg, overwrite=True, warn=lambda m: None)
                        f1 = summary["best"]["val_f1"]
                    except Exception as e:  # noqa: BLE001 - a non-finite loss or logits: recorded
                        stopped, f1 = str(e).split(";")[0][:60], float("nan")
                ref = seen[0] if seen else float("nan")  # the rule's reference: the run's first step
                finite = [v for v in seen[1:] if math.isfinite(v)]
                peak = max(finite) / ref if finite and ref else float("nan")
                # the first step at which 5x / 10x / 20x the first step's loss (or a non-finite one) would stop it
                at = {k: next((i + 1 for i, v in enumerate(seen) if i >= 1 and (not math.isfinite(v) or v > k * ref)), None)
                      for k in (5, 10, 20)}
                rows.append({"mix": mix, "loss": loss, "lr": lr, "steps": len(seen), "first": ref, "peak_ratio": peak,
                             "last": seen[-1] if seen else float("nan"), "max": max(finite) if finite else float("nan"),
                             "f1": f1, "stop5": at[5], "stop10": at[10], "stop20": at[20], "nonfinite_or_error": stopped,
                             "losses": list(seen)})
                r = rows[-1]
                print(f"{mix:7s} {loss:7s} lr {lr:<8g} steps {r['steps']:3d} step 1 {ref:6.3g} peak/step 1 {peak:10.3g} "
                      f"F1 {f1:.3f} stops at 5x@{at[5]} 10x@{at[10]} 20x@{at[20]} {stopped[:40]}", flush=True)
    (base / "divergence.json").write_text(json.dumps(rows, indent=1, default=str))
    for lo, hi in ((0, 0.01), (0.1, 0.1), (1, math.inf)):
        part = [r for r in rows if lo <= r["lr"] <= hi and r["loss"] != "f1"]
        print(f"lr {lo:g}..{hi:g} (not f1): peak/step 1 max {max(r['peak_ratio'] for r in part):.3g}, min "
              f"{min(r['peak_ratio'] for r in part):.3g}; stopped by 10x {sum(r['stop10'] is not None for r in part)} "
              f"of {len(part)}")


if __name__ == "__main__":
    main()
