"""Crop throughput: `maskcls crop` vs the plain MTCNN loop (bench/plain_crop.py), whole processes
(interpreter start and model loading included), on the same photos, in the same run, on the same device.

    python bench/crop.py [--photos 301] [--repeat 3] [--workdir DIR] [--device cpu|cuda]

On a GPU (`--device cuda`, the issue's target there is >= 10x) use more photos, e.g. --photos 2001:
the fixed start-up costs weigh more when the per-photo work is small.

Quality is judged against the true boxes: a crop counts as face-centred when its box has IoU >= 0.5
with the face's known box.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from workload import iou, make_workload, workdir  # noqa: E402


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=301)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    work = workdir(args.workdir)
    raw = work / "raw"
    truth = make_workload(raw, args.photos)
    n = len(truth)
    plain_t, ours_t = [], []
    for _ in range(args.repeat):
        for d in ("plain", "ours"):
            shutil.rmtree(work / d, ignore_errors=True)
        plain_t.append(timed([sys.executable, str(ROOT / "bench" / "plain_crop.py"), str(raw), str(work / "plain"),
                              args.device]))
        ours_t.append(timed([sys.executable, str(ROOT / "cli.py"), "crop", str(raw), "--out", str(work / "ours"),
                             "--device", args.device]))
    plain_boxes = json.loads((work / "plain" / "boxes.json").read_text())
    with open(work / "ours" / "manifest.csv") as f:
        ours_rows = {r["source"]: r for r in csv.DictReader(f)}
    plain_hits = sum(1 for s, b in truth.items() if plain_boxes.get(s) and iou(plain_boxes[s], b) >= 0.5)
    ours_hits = sum(1 for s, b in truth.items()
                    if ours_rows[s]["x1"] and iou([float(ours_rows[s][k]) for k in ("x1", "y1", "x2", "y2")], b) >= 0.5)
    statuses = {}
    for r in ours_rows.values():
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    tp, to = statistics.median(plain_t), statistics.median(ours_t)
    print(f"photos: {n} (384x512, one face each), repeats: {args.repeat}, median wall time per process")
    print(f"baseline plain MTCNN loop: {tp:6.2f} s  {n / tp:6.1f} photos/s  face-centred crops {plain_hits}/{n}")
    print(f"maskcls crop             : {to:6.2f} s  {n / to:6.1f} photos/s  face-centred crops {ours_hits}/{n}  "
          f"statuses {statuses}")
    target = ">= 10x on a GPU" if args.device.startswith("cuda") else ">= 5x"
    print(f"device: {args.device} for both")
    print(f"speed ratio maskcls/baseline: {tp / to:.2f}x (target {target})")


if __name__ == "__main__":
    main()
