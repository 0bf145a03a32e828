"""What the pipeline costs as the data grows to the competition's size: time and peak RSS of `maskcls crop`,
of one training epoch and of `maskcls predict`, each a fresh process, at several sizes.

    python bench/scale.py --workdir /tmp/bscale [--sizes 959,4795,18900] [--eval-sizes 959,4795,12600]
                          [--stages crop,train,predict] [--img-size 224] [--model resnet18]

The photos are the bench workload (`bench/workload.py`: 301 training photos of 43 people, 105 lone eval
photos) repeated: person folders hard-linked under new ids, eval photos under new names, so every size
holds the same kinds of photo in the same proportions and the per-photo work is alike. Detection still
runs on every photo (the crop stage keys its cache by path). `train` is one epoch (validation, calibration
and the files it writes included) with `--weights none` (offline here; the step costs the same);
`predict` crops the eval photos itself (`--crops`), as a user's first predict does. Peak RSS: os.wait4's
ru_maxrss of the process. Prints a Markdown table and writes scale.json and scale.png in the work folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from workload import make_lone_workload, make_workload, workdir  # noqa: E402


def repeat_people(base: Path, dst: Path, photos: int) -> int:
    """dst/images with ceil(photos / 7) person folders, each a hard-linked copy of a base person under a new id."""
    if (dst / "done").is_file() and (dst / "done").read_text() == str(photos):
        return photos
    shutil.rmtree(dst, ignore_errors=True)
    folders = sorted(p for p in (base / "images").iterdir() if p.is_dir())
    for k in range(-(-photos // 7)):
        src = folders[k % len(folders)]
        _, gender, race, age = src.name.split("_")
        new = dst / "images" / f"{k + 1:06d}_{gender}_{race}_{age}"
        new.mkdir(parents=True)
        for f in src.iterdir():
            os.link(f, new / f.name)
    (dst / "done").write_text(str(photos))
    return photos


def repeat_eval(base: Path, dst: Path, photos: int) -> int:
    """An eval folder (images/, info.csv) of `photos` lone photos, the base's hard-linked under new names."""
    if (dst / "done").is_file() and (dst / "done").read_text() == str(photos):
        return photos
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "images").mkdir(parents=True)
    names = sorted(p.name for p in (base / "images").iterdir())
    out = []
    for k in range(photos):
        name = f"{k:06d}_{names[k % len(names)]}"
        os.link(base / "images" / names[k % len(names)], dst / "images" / name)
        out.append(name)
    (dst / "info.csv").write_text("ImageID,ans\n" + "".join(f"{n},0\n" for n in out))
    (dst / "done").write_text(str(photos))
    return photos


def measure(cmd: list, log: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one fresh process; its output goes to `log`."""
    with open(log, "w") as f:
        t = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[2]} failed (exit {proc.returncode}): see {log}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--sizes", default="959,4795,18900")
    ap.add_argument("--eval-sizes", default="959,4795,12600")
    ap.add_argument("--stages", default="crop,train,predict")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--model", default="resnet18")
    args = ap.parse_args()
    work = workdir(args.workdir)
    stages = args.stages.split(",")
    make_workload(work / "base", 301)
    make_lone_workload(work / "lone", 105)
    cli = [sys.executable, ROOT / "cli.py"]
    results = json.loads((work / "scale.json").read_text()) if (work / "scale.json").is_file() else {}
    sizes = [int(s) for s in args.sizes.split(",")]
    for n in sizes:
        raw, crops = work / f"raw{n}", work / f"crops{n}"
        repeat_people(work / "base", raw, n)
        if "crop" in stages or not (crops / "manifest.csv").is_file():
            shutil.rmtree(crops, ignore_errors=True)
            s, rss = measure([*cli, "crop", raw, "--out", crops, "--device", "cpu"], work / f"crop{n}.log")
            results[f"crop {n}"] = {"seconds": s, "rss_mib": rss, "photos": n}
            print(f"crop {n} photos: {s:.1f} s ({n / s:.1f} photos/s), peak RSS {rss:.0f} MiB", flush=True)
        if "train" in stages:
            run = work / f"run{n}"
            s, rss = measure([*cli, "train", crops, "--out", run, "--overwrite", "--epochs", "1", "--model", args.model,
                              "--img-size", args.img_size, "--weights", "none", "--device", "cpu"], work / f"train{n}.log")
            results[f"train {n}"] = {"seconds": s, "rss_mib": rss, "photos": n}
            print(f"train 1 epoch, {n} photos: {s:.1f} s ({n / s:.1f} photos/s), peak RSS {rss:.0f} MiB", flush=True)
    if "predict" in stages:
        run = work / f"run{sizes[0]}"
        if not (run / "best.pt").is_file():
            raise SystemExit(f"predict needs a run: {run} has no best.pt (run --stages train first)")
        for n in (int(s) for s in args.eval_sizes.split(",")):
            ev, ec = work / f"eval{n}", work / f"evalcrops{n}"
            repeat_eval(work / "lone", ev, n)
            shutil.rmtree(ec, ignore_errors=True)
            s, rss = measure([*cli, "predict", run, ev, "--out", work / f"sub{n}.csv", "--crops", ec, "--device", "cpu"],
                             work / f"predict{n}.log")
            results[f"predict {n}"] = {"seconds": s, "rss_mib": rss, "photos": n}
            print(f"predict {n} photos (crop included): {s:.1f} s ({n / s:.1f} photos/s), peak RSS {rss:.0f} MiB",
                  flush=True)
    (work / "scale.json").write_text(json.dumps(results, indent=1))
    print("\n| stage | photos | seconds | photos/s | peak RSS, MiB |\n| --- | --- | --- | --- | --- |")
    for k, v in results.items():
        print(f"| {k.split()[0]} | {v['photos']:,} | {v['seconds']:.1f} | {v['photos'] / v['seconds']:.1f} | "
              f"{v['rss_mib']:.0f} |")
    plot(results, work / "scale.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in ("crop", "train", "predict"):
        pts = sorted((v["photos"], v["seconds"], v["rss_mib"]) for k, v in results.items() if k.startswith(stage))
        if pts:
            a.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=stage)
            b.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=stage)
    a.set(xlabel="photos", ylabel="seconds", title="time")
    b.set(xlabel="photos", ylabel="MiB", title="peak RSS", ylim=(0, None))
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
