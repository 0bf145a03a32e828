"""Crop throughput and crop quality: `maskcls crop` vs the plain MTCNN loop (bench/plain_crop.py),
whole processes (interpreter start and model loading included), on the same photos, in the same run,
on the same device.

    python bench/crop.py [--photos 301] [--lone 105] [--repeat 3] [--workdir DIR] [--device cpu|cuda] [--root DIR]

Speed: the train-layout workload (bench/workload.py: a third of the people have a bystander),
median of --repeat runs of each. Quality: a crop is face-centred when its box has IoU >= 0.5 with the
subject's known box; counted by kind (mask, incorrect, normal) and for lone eval-style photos, which
maskcls crops with the face prior learned from the training crops (`--prior`), as predict does.
`--root DIR` runs another checkout's cli.py as "maskcls" (e.g. a `git worktree` of an older commit).

On a GPU (`--device cuda`, the target there is >= 10x) use more photos, e.g. --photos 2001: the fixed
start-up costs weigh more when the per-photo work is small.
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
from workload import iou, make_lone_workload, make_workload, workdir  # noqa: E402


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def manifest_boxes(crops: Path) -> dict[str, list[float] | None]:
    with open(crops / "manifest.csv") as f:
        return {r["source"]: [float(r[k]) for k in ("x1", "y1", "x2", "y2")] if r["x1"] else None
                for r in csv.DictReader(f)}


def count_statuses(crops: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(crops / "manifest.csv") as f:
        for r in csv.DictReader(f):
            out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def hits_by_kind(truth: dict, kinds: dict, boxes: dict) -> dict[str, tuple[int, int]]:
    """{group: (face-centred, photos)} for each kind, with and without a bystander, and overall."""
    out: dict[str, list[int]] = {}
    for src, box in truth.items():
        k = kinds[src]
        hit = int(bool(boxes.get(src)) and iou(boxes[src], box) >= 0.5)
        by = "bystander" if k["bystander"] else "alone"
        for g in (k["kind"], f"{k['kind']}/{by}", f"all/{by}", "all"):
            out.setdefault(g, [0, 0])
            out[g][0] += hit
            out[g][1] += 1
    return {g: (h, n) for g, (h, n) in out.items()}


def show(name: str, res: dict[str, tuple[int, int]]) -> str:
    order = ["mask", "incorrect", "normal", "lone"]
    parts = []
    for kind in order + ["all"]:
        if kind not in res:
            continue
        h, n = res[kind]
        sub = "  ".join(f"{by} {res[f'{kind}/{by}'][0]}/{res[f'{kind}/{by}'][1]}" for by in ("alone", "bystander")
                        if f"{kind}/{by}" in res)
        parts.append(f"  {kind:9s} {h:4d}/{n:<4d} ({100 * h / n:5.1f}%)   [{sub}]")
    return f"{name}\n" + "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=301)
    ap.add_argument("--lone", type=int, default=105)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose cli.py is run as maskcls")
    args = ap.parse_args()
    work = workdir(args.workdir)
    raw, lone = work / "raw", work / "lone"
    truth = make_workload(raw, args.photos)
    kinds = json.loads((raw / "kinds.json").read_text())
    lone_truth = make_lone_workload(lone, args.lone)
    lone_kinds = json.loads((lone / "kinds.json").read_text())
    cli = [sys.executable, str(args.root / "cli.py"), "crop"]
    n = len(truth)
    plain_t, ours_t = [], []
    for _ in range(args.repeat):
        for d in ("plain", "ours"):
            shutil.rmtree(work / d, ignore_errors=True)
        plain_t.append(timed([sys.executable, str(ROOT / "bench" / "plain_crop.py"), str(raw), str(work / "plain"),
                              args.device]))
        ours_t.append(timed(cli + [str(raw), "--out", str(work / "ours"), "--device", args.device]))
    # Lone photos: not timed; maskcls with the training crops' prior where this checkout has one.
    for d in ("plain_lone", "ours_lone", "builtin_lone"):
        shutil.rmtree(work / d, ignore_errors=True)
    subprocess.run([sys.executable, str(ROOT / "bench" / "plain_crop.py"), str(lone), str(work / "plain_lone"),
                    args.device], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    has_prior = "prior" in json.loads((work / "ours" / "crops.json").read_text())
    subprocess.run(cli + [str(lone), "--out", str(work / "ours_lone"), "--device", args.device]
                   + (["--prior", str(work / "ours")] if has_prior else []),
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if has_prior:  # the same lone photos with the built-in prior: what the learned one adds
        subprocess.run(cli + [str(lone), "--out", str(work / "builtin_lone"), "--device", args.device],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    plain = json.loads((work / "plain" / "boxes.json").read_text()) | \
        {f"lone:{k}": v for k, v in json.loads((work / "plain_lone" / "boxes.json").read_text()).items()}
    ours = manifest_boxes(work / "ours") | {f"lone:{k}": v for k, v in manifest_boxes(work / "ours_lone").items()}
    all_truth = truth | {f"lone:{k}": v for k, v in lone_truth.items()}
    all_kinds = kinds | {f"lone:{k}": v for k, v in lone_kinds.items()}
    statuses, lone_statuses = count_statuses(work / "ours"), count_statuses(work / "ours_lone")
    tp, to = statistics.median(plain_t), statistics.median(ours_t)
    n_by = sum(1 for k in kinds.values() if k["bystander"])
    print(f"photos: {n} in person folders (384x512; {n_by} with a bystander in frame) + {len(lone_truth)} lone "
          f"eval-style photos; repeats: {args.repeat}, median wall time per process (person folders only)")
    print(f"baseline plain MTCNN loop: {tp:6.2f} s  {n / tp:6.1f} photos/s")
    print(f"maskcls crop ({args.root.name}): {to:6.2f} s  {n / to:6.1f} photos/s  statuses {statuses}")
    print(f"device: {args.device} for both; lone photos cropped by maskcls with "
          f"{'the training crops prior (--prior)' if has_prior else 'no prior (this checkout has none)'}")
    print(f"speed ratio maskcls/baseline: {tp / to:.2f}x (target >= 10x, issue 37; issue 13's was 7x on the CPU)")
    print("face-centred crops (IoU >= 0.5 with the subject's box), by kind [without / with a bystander]:")
    print(show("baseline plain MTCNN loop", hits_by_kind(all_truth, all_kinds, plain)))
    print(show("maskcls crop", hits_by_kind(all_truth, all_kinds, ours)))
    print(f"maskcls lone photos' statuses: {lone_statuses} (a prior_box counts as face-centred when it is)")
    if has_prior:
        builtin = {f"lone:{k}": v for k, v in manifest_boxes(work / "builtin_lone").items()}
        res = hits_by_kind(lone_truth and {f"lone:{k}": v for k, v in lone_truth.items()}, all_kinds, builtin)
        print(show("maskcls crop, lone photos with the built-in prior (no --prior)", res).replace("\n  all", "\n  (all)"))
        print(f"  statuses: {count_statuses(work / 'builtin_lone')}")


if __name__ == "__main__":
    main()
