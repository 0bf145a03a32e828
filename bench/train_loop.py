"""Training throughput of the real loop (`classify.training.train.fit`: loader, augmentation, step, the
finite-loss check), images/s between the first and the last step of one epoch, for several models.

    python bench/train_loop.py [--models resnet18,mobilenet_v2,...] [--root CHECKOUT] [--photos 700]

`--root` imports maskcls from another checkout (e.g. a `git worktree` of an older commit), so the
same script measures both in one run: the baseline is the older tree on the same photos and machine.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,mobilenet_v2,attention,timm/efficientnet_b0.ra_in1k")
    ap.add_argument("--root", type=Path, default=HERE)
    ap.add_argument("--photos", type=int, default=700, help="photos in the synthetic crops folder (100 people)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, str(args.root))
    sys.path.insert(1, str(HERE))  # tests.conftest (the synthetic crops) from this tree
    from classify.training.train import TrainConfig, fit
    from tests.conftest import make_crops

    work = Path(tempfile.mkdtemp(prefix="maskcls-loop-"))
    try:
        crops = make_crops(work / "crops", people=args.photos // 7, size=256)
        print(f"root {args.root}, {args.photos} photos of 256 px, batch {args.batch} at {args.img_size} px, "
              f"workers {args.workers}, CPU")
        for name in args.models.split(","):
            model = dict(model="attention", backbone="resnet18") if name == "attention" else dict(model=name)
            stamps = []
            t0 = time.perf_counter()
            try:
                fit(TrainConfig(crops=str(crops), out=str(work / name.replace("/", "_")), epochs=1,
                                img_size=args.img_size, batch_size=args.batch, workers=args.workers, weights="none",
                                device="cpu", preset="base", val_ratio=0.1, **model),
                    on_step=lambda done, total: stamps.append(time.perf_counter()), warn=lambda m: None)
            except Exception as e:  # noqa: BLE001 - an older tree may not know the model
                print(f"  {name:32s} n/a ({type(e).__name__}: {str(e)[:80]})")
                continue
            rate = (len(stamps) - 1) * args.batch / (stamps[-1] - stamps[0])
            print(f"  {name:32s} {rate:7.1f} images/s  (epoch of {len(stamps)} steps, whole fit {time.perf_counter() - t0:.0f} s)",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
