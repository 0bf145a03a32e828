"""Peak memory of `maskcls crop` over 1,000 photos vs over 100 photos (the crop stage streams).

    python bench/memory.py [--small 100] [--large 1000] [--workdir DIR]

Each run is a fresh process measured with getrusage(RUSAGE_CHILDREN).ru_maxrss (peak RSS).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from workload import make_workload, workdir  # noqa: E402

PROBE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
         "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def subset(raw: Path, dst: Path, n: int) -> None:
    """A raw folder with the first n photos' person folders (linked, not copied)."""
    truth = json.loads((raw / "truth.json").read_text())
    folders = sorted({Path(s).parent.name for s in truth})[: -(-n // 7)]
    (dst / "images").mkdir(parents=True, exist_ok=True)
    for f in folders:
        (dst / "images" / f).symlink_to(raw / "images" / f, target_is_directory=True)


def peak_kib(raw: Path, out: Path) -> int:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "cli.py"), "crop", str(raw), "--out", str(out), "--device", "cpu"]
    res = subprocess.run([sys.executable, "-c", PROBE, *cmd], check=True, capture_output=True, text=True)
    return int(res.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--large", type=int, default=1000)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = workdir(args.workdir)
    raw = work / "raw-mem"
    make_workload(raw, args.large, seed=1)
    results = {}
    for n in (args.small, args.large):
        sub = work / f"raw-{n}"
        shutil.rmtree(sub, ignore_errors=True)
        subset(raw, sub, n)
        results[n] = peak_kib(sub, work / f"out-{n}")
        photos = len(list((work / f"out-{n}" / "crops").rglob("*.jpg")))
        print(f"{photos:5d} photos: peak RSS {results[n] / 1024:7.1f} MiB")
    ratio = results[args.large] / results[args.small]
    print(f"peak RSS ratio {args.large} / {args.small} photos: {ratio:.3f} (target <= 1.25)")


if __name__ == "__main__":
    main()
