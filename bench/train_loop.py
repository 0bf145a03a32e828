"""Training throughput of the real loop (`classify.training.train.fit`: loader, augmentation, step, the
finite-loss check), images/s between the first and the last step of one epoch, for several models.

    python bench/train_loop.py [--models resnet18,mobilenet_v2,...] [--root CHECKOUT] [--photos 700] [--plain]

`--root` imports maskcls from another checkout (e.g. a `git worktree` of an older commit), so the
same script measures both in one run: the baseline is the older tree on the same photos and machine.
`--plain` also times the usual competition script on the same crops (the baseline for maskcls' own
overhead): an ImageFolder-style Dataset opening each JPEG crop with PIL, torchvision RandomResizedCrop
+ flip + ToTensor + Normalize, a DataLoader with the same workers, torchvision's model with 18 outputs,
AdamW and cross-entropy, for the same number of steps of the same batch and image size.
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
    ap.add_argument("--plain", action="store_true", help="also time the plain torchvision loop (torchvision models only)")
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
            if args.plain and name not in ("attention",) and "/" not in name:
                plain = plain_loop(crops, name, len(stamps), args)
                print(f"  {'plain torchvision loop, ' + name:32s} {plain:7.1f} images/s  (same steps; maskcls/plain "
                      f"{rate / plain:.2f}x)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plain_loop(crops: Path, name: str, steps: int, args) -> float:
    """images/s of the usual script over `steps` steps (after one warm-up step), as fit's figure is taken."""
    import csv

    import torch
    import torchvision
    from PIL import Image
    from torchvision import transforms as T

    with open(crops / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f)]
    tf = T.Compose([T.RandomResizedCrop(args.img_size, scale=(0.6, 1.0), ratio=(0.85, 1.18)), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    class Crops(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return tf(Image.open(crops / rows[i]["crop"]).convert("RGB")), int(rows[i]["label"])

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(Crops(), batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                         drop_last=True, persistent_workers=args.workers > 0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=18)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    stamps, it = [], iter(loader)
    while len(stamps) < steps:
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) * args.batch / (stamps[-1] - stamps[0])


if __name__ == "__main__":
    main()
