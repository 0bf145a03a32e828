"""Training data path: maskcls's loader over cached crops vs the usual competition loader.

    python bench/loader.py [--photos 301] [--batches 20] [--workdir DIR] [--workers 0]

Baseline: a Dataset that opens the full photo with PIL and applies torchvision
CenterCrop(384) → RandomResizedCrop(224) → RandomHorizontalFlip → ToTensor → Normalize.
maskcls: CropDataset over the crop stage's crops.npy with the `base` preset at 224.
Both run in the main process (num_workers=0), so images/s is per worker. The baseline yields float
batches 32 x 3 x 224 x 224; maskcls yields the same shape in uint8 and normalises on the device
(`transforms.normalize`); the third line counts that normalisation on the CPU too.
`--workers 1`: both loaders with one DataLoader worker each (batches cross from the worker in shared
memory: a new segment each batch, for both), as a training run with workers loads.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from workload import make_workload, workdir  # noqa: E402


class CompetitionDataset(Dataset):
    def __init__(self, paths, labels):
        from torchvision import transforms as T
        self.paths, self.labels = paths, labels
        self.tf = T.Compose([T.CenterCrop(384), T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                             T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        return self.tf(Image.open(self.paths[i]).convert("RGB")), self.labels[i]


def rate(loader, batches: int, post=None) -> tuple[float, tuple]:
    it = iter(loader)
    x = next(it)[0]  # warm-up batch (file cache, lazy mmap)
    n, t = 0, time.perf_counter()
    for _ in range(batches):
        try:
            x = next(it)[0]
        except StopIteration:
            it = iter(loader)
            x = next(it)[0]
        if post is not None:
            x = post(x)
        n += x.shape[0]
    return n / (time.perf_counter() - t), tuple(x.shape)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=301)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    work = workdir(args.workdir)
    raw = work / "raw"
    truth = make_workload(raw, args.photos)
    crops = work / "ours"
    if not (crops / "crops.npy").is_file():
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "crop", str(raw), "--out", str(crops), "--device", "cpu"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from classify.data.dataset import CropDataset, collate, load_rows
    from classify.data.transforms import build_transform, normalize

    torch.set_num_threads(1)  # one worker = one core, for both
    _, rows = load_rows(crops)
    ours = CropDataset(crops, rows, build_transform("base", 224, train=True), seed=0)
    assert ours._packed_path is not None, "crops.npy missing or stale"
    base = CompetitionDataset([raw / s for s in sorted(truth)], [0] * len(truth))
    kw = dict(batch_size=32, shuffle=True, num_workers=args.workers, generator=torch.Generator().manual_seed(0),
              persistent_workers=args.workers > 0)
    runs = {"base": [], "ours": [], "norm": []}
    for _ in range(args.repeat):  # interleaved, so drift in the machine's speed hits all three alike
        r, s_base = rate(DataLoader(base, **kw), args.batches)
        runs["base"].append(r)
        r, s_ours = rate(DataLoader(ours, collate_fn=collate, **kw), args.batches)  # as engine.make_loader builds it
        runs["ours"].append(r)
        r, s_norm = rate(DataLoader(ours, collate_fn=collate, **kw), args.batches, post=normalize)
        runs["norm"].append(r)
    r_base, r_ours, r_norm = (statistics.median(runs[k]) for k in ("base", "ours", "norm"))
    assert s_base == s_norm, (s_base, s_norm)
    assert s_base == s_ours, (s_base, s_ours)  # the same batch shape: N x 3 x 224 x 224
    where = "one process" if not args.workers else f"{args.workers} worker(s) each"
    print(f"batches: baseline {s_base} float32, maskcls {s_ours} uint8 (→ float32 after normalize()); "
          f"{args.batches} batches each, median of {args.repeat}, {where}, torch threads 1")
    print(f"baseline PIL full photo + torchvision transforms (float batches) : {r_base:7.1f} images/s")
    print(f"maskcls CropDataset over crops.npy, preset base (uint8 batches)  : {r_ours:7.1f} images/s")
    print(f"  the same + normalize() on the CPU (what a CPU training step adds): {r_norm:7.1f} images/s")
    print(f"speed ratio maskcls/baseline: {r_ours / r_base:.2f}x (target >= 20x, issue 37); "
          f"with CPU normalisation counted: {r_norm / r_base:.2f}x")


if __name__ == "__main__":
    main()
