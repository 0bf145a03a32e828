"""The exported-model path before and after a change (issues 28, 29): `maskcls predict model.onnx` start-up
and throughput (whole process, warm crop cache), `maskcls serve` requests/s and latency, and serve under a
burst of pixel-bomb requests beside normal clients (peak RSS, the normal clients' p99, failures).

    python bench/onnx_path.py --root /tmp/old --workdir /tmp/bop     # the tree before, e.g. a git worktree
    python bench/onnx_path.py --workdir /tmp/bop                     # this tree

Each tree crops data_samples/train, trains 1 epoch (resnet18, 64 px) and exports with its own code, so
the graph is the one that tree writes. Photos: data_samples/eval (real faces, 384x512).
"""
from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent


def run(cmd, cwd, **kw):
    r = subprocess.run([sys.executable, *map(str, cmd)], cwd=cwd, capture_output=True, text=True, **kw)
    if r.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{r.stderr[-3000:]}")
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def clients(url, photos, n_clients, per_client, files_of=None):
    """Latencies (s) and failures of `n_clients` threads sending `per_client` requests each."""
    import httpx

    lat, fails = [], []

    def one(k):
        with httpx.Client(timeout=300) as c:
            for j in range(per_client):
                files = files_of(k, j) if files_of else [("file", (photos[(k + j) % len(photos)].name,
                                                                    photos[(k + j) % len(photos)].read_bytes(), "image/jpeg"))]
                t0 = time.perf_counter()
                try:
                    r = c.post(url + "/predict", files=files)
                    (lat if r.status_code == 200 else fails).append(time.perf_counter() - t0 if r.status_code == 200
                                                                     else r.status_code)
                except Exception as e:  # noqa: BLE001 - a failed request is a figure here
                    fails.append(type(e).__name__)

    ts = [threading.Thread(target=one, args=(k,)) for k in range(n_clients)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return lat, fails, time.perf_counter() - t0


def bomb_png(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 180, 160)).save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=HERE, help="the maskcls tree to measure")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bop"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    root, w = args.root.resolve(), args.workdir / args.root.resolve().name
    w.mkdir(parents=True, exist_ok=True)
    eval_dir = HERE / "data_samples" / "eval"
    photos = sorted((eval_dir / "images").iterdir())
    if not (w / "m.onnx").is_file():
        run(["cli.py", "crop", HERE / "data_samples" / "train", "--out", w / "crops"], root)
        run(["cli.py", "train", w / "crops", "--out", w / "run", "--model", "resnet18", "--epochs", "1", "--img-size", "64",
             "--weights", "none", "--device", "cpu", "--overwrite"], root)
        run(["cli.py", "export", w / "run", "--out", w / "m.onnx"], root)
        run(["cli.py", "predict", w / "m.onnx", eval_dir, "--out", w / "s.csv", "--crops", w / "ec"], root)  # warm cache
    out = {"root": str(root)}
    secs = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        run(["cli.py", "predict", w / "m.onnx", eval_dir, "--out", w / "s.csv", "--crops", w / "ec"], root)
        secs.append(time.perf_counter() - t0)
    out["predict_onnx_s"] = sorted(secs)[len(secs) // 2]
    out["predict_onnx_photos"] = len(photos)
    code = "import sys, time; t = time.perf_counter(); import cli; print(time.perf_counter() - t)"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "cli.py", "serve", str(w / "m.onnx"), "--port", str(port)], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx

    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(url + "/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    try:
        clients(url, photos, 2, 5)  # warm-up
        for n in (1, 8):
            lat, fails, wall = clients(url, photos, n, 100 // n)
            out[f"serve_{n}_clients"] = {"req_s": round(len(lat) / wall, 2), "p50_ms": round(1000 * np.percentile(lat, 50)),
                                         "p99_ms": round(1000 * np.percentile(lat, 99)), "failed": len(fails)}
        big = bomb_png(4000)  # 16 MP decoded (48 MB), ~50 KB on disk; 4 per request = 64 MP
        peak, stop = [rss_mib(proc.pid)], threading.Event()

        def watch():
            while not stop.wait(0.05):
                peak.append(rss_mib(proc.pid))

        watcher = threading.Thread(target=watch)
        watcher.start()
        res = {}

        def bombs():
            res["bombs"] = clients(url, photos, 16, 1, files_of=lambda k, j: [("file", (f"b{i}.png", big, "image/png"))
                                                                              for i in range(4)])

        tb = threading.Thread(target=bombs)
        tb.start()
        lat, fails, wall = clients(url, photos, 16, 4)
        tb.join()
        stop.set()
        watcher.join()
        blat, bfails, _ = res["bombs"]
        out["burst"] = {"normal_p99_ms": round(1000 * np.percentile(lat, 99)) if lat else None,
                        "normal_ok": len(lat), "normal_failed": len(fails), "bomb_requests_answered_200": len(blat),
                        "bomb_statuses": sorted({str(f) for f in bfails}), "peak_rss_mib": round(max(peak)),
                        "rss_before_mib": round(peak[0])}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    start = run(["-c", code], root)
    out["import_cli_s"] = float(start.stdout.strip())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
