"""Where predict's memory goes: `maskcls predict RUN EVAL --crops CROPS` as a child process, its own and its
DataLoader workers' /proc/PID/status sampled every 0.2 s (RssAnon, RssFile, RssShmem), under one or more
environments in the same session, so allocator settings can be compared with nothing else changed.

    python bench/predict_memory.py RUN EVAL --crops CROPS [--env NAME=K=V,K=V ...] [--repeat 1] [--out FILE]

CROPS should hold the eval photos' crops already (a first predict with --crops writes them), so that what is
measured is inference. Prints per environment: seconds, the main process's peak anonymous and file-backed
memory and its anonymous memory at 25%, 50%, 75% and the end of the run, and the workers' peaks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("RssAnon", "RssFile", "RssShmem")


def status(pid: int) -> dict[str, float] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k in FIELDS:
            out[k] = int(v.split()[0]) / 1024
    return out


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def measure(cmd: list[str], env: dict[str, str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=os.environ | env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    main, workers = [], {}
    while proc.poll() is None:
        s = status(proc.pid)
        if s:
            main.append((time.perf_counter() - t0, s))
        for c in children(proc.pid):
            w = status(c)
            if w:
                peak = workers.setdefault(c, {k: 0.0 for k in FIELDS})
                for k in FIELDS:
                    peak[k] = max(peak[k], w.get(k, 0.0))
        time.sleep(0.2)
    secs = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{err[-2000:]}")
    anon = [s["RssAnon"] for _, s in main]
    at = {f"anon_at_{q}": anon[min(len(anon) - 1, int(len(anon) * q / 100))] for q in (25, 50, 75)} if anon else {}
    return {"seconds": round(secs, 1), "main_peak_anon": max(anon, default=0),
            "main_peak_file": max((s["RssFile"] for _, s in main), default=0), **at,
            "anon_at_end": anon[-1] if anon else 0,
            "worker_peak_anon": max((w["RssAnon"] for w in workers.values()), default=0),
            "worker_peak_file": max((w["RssFile"] for w in workers.values()), default=0), "workers": len(workers)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("eval")
    ap.add_argument("--crops", required=True)
    ap.add_argument("--env", action="append", default=[],
                    help="NAME=K=V,K=V: an environment to compare (the plain one, 'default', always runs first)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    envs = {"default": {}}
    for spec in args.env:
        name, _, pairs = spec.partition("=")
        envs[name] = dict(p.split("=", 1) for p in pairs.split(",") if p)
    cmd = [sys.executable, str(ROOT / "cli.py"), "predict", args.run, args.eval, "--out", "/tmp/predict_memory_sub.csv",
           "--crops", args.crops, "--device", "cpu"]
    results = []
    for k in range(args.repeat):
        for name, env in envs.items():  # alternated, so a drift of the machine hits every environment alike
            r = {"env": name, "vars": env, "round": k} | measure(cmd, env)
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
