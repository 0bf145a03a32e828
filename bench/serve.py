"""`maskcls serve` under load against a naive handler (bench/naive_server.py: what community apps of this
task do), same model, same photos, this machine; and the classifier alone in onnxruntime (fp32, int8)
against torch eager.

    python bench/serve.py --run RUN [--photos 105] [--requests 2000] [--workdir DIR]

RUN: a run folder trained on real-looking faces (e.g. bench/calibration.py's). Photos: lone eval-style
photos (bench/workload.py make_lone_workload). Reported: one client's latency p50/p99, requests/s at 1,
4 and 16 concurrent clients, failed requests over --requests at 16 clients, and the server's RSS after
100 requests (one client), after 200 at 16 clients, and after the --requests soak.

The baseline takes its upload as FastAPI's `UploadFile`, which needs python-multipart (`pip install
python-multipart`; maskcls parses its uploads itself and does not).
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from workload import make_lone_workload, workdir  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, port) -> subprocess.Popen:
    import httpx

    import tempfile

    log = tempfile.TemporaryFile("w+")  # serve logs a line per request: a pipe nobody reads would fill and block it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, cwd=ROOT)
    for _ in range(600):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    log.seek(0)
    raise SystemExit("server did not start: " + log.read()[-2000:])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(url: str, photos: list[Path], clients: int, requests: int) -> dict:
    """`requests` single-photo requests from `clients` threads: requests/s, latencies, failures."""
    import httpx

    data = [(p.name, p.read_bytes()) for p in photos]
    lat, fails, lock = [], [0], threading.Lock()
    counter = iter(range(requests))

    def client():
        with httpx.Client(timeout=120) as c:
            for k in counter:
                name, body = data[k % len(data)]
                t = time.perf_counter()
                try:
                    ok = c.post(url, files=[("file", (name, body, "image/jpeg"))]).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    lat.append(time.perf_counter() - t)
                    fails[0] += not ok

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    return {"clients": clients, "requests": requests, "per_s": round(requests / secs, 2), "failed": fails[0],
            "p50_ms": round(1000 * float(np.percentile(lat, 50)), 1), "p99_ms": round(1000 * float(np.percentile(lat, 99)), 1)}


def classifier_alone(run: Path, model: Path, base: Path) -> dict:
    """ms per image: torch eager vs onnxruntime fp32 and int8, batch 1 and 32."""
    import torch

    from classify.checkpoint import load_checkpoint
    from classify.deploy.export import export
    from classify.inference.onnx_model import OnnxModel
    from classify.inference.torch_backend import checkpoint_paths, load_model

    ckpt = load_checkpoint(checkpoint_paths([run])[0])
    net = load_model(ckpt, torch.device("cpu"))
    q = export([run], base / "int8.onnx", int8=True)
    fp32, int8 = OnnxModel(model), OnnxModel(base / "int8.onnx")
    s = fp32.img_size
    out = {"int8_change": q.int8}
    for batch in (1, 32):
        x = np.random.default_rng(0).integers(0, 256, (batch, 3, s, s), dtype=np.uint8)
        xt = (torch.from_numpy(x).float() / 255 - 0.45) / 0.225
        for name, fn in (("torch_eager", lambda: net(xt)), ("onnx_fp32", lambda: fp32.run(x)), ("onnx_int8", lambda: int8.run(x))):
            with torch.no_grad():
                fn()
                reps = max(3, 64 // batch)
                t = time.perf_counter()
                for _ in range(reps):
                    fn()
            out[f"{name}_batch{batch}_ms_per_image"] = round(1000 * (time.perf_counter() - t) / (reps * batch), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--photos", type=int, default=105)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--naive-requests", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    base = workdir(args.workdir)
    make_lone_workload(base / "lone", args.photos)
    photos = sorted((base / "lone" / "images").iterdir())
    from classify.deploy.export import export
    from classify.inference.torch_backend import checkpoint_paths

    model = export([args.run], base / "model.onnx").path
    result = {}
    port = free_port()
    ours = start([sys.executable, str(ROOT / "cli.py"), "serve", str(model), "--port", str(port)], port)
    url = f"http://127.0.0.1:{port}/predict"
    try:
        load(url, photos[:8], 1, 16)  # warm up
        result["maskcls_one_client"] = load(url, photos, 1, 100)
        result["maskcls_rss_after_100_mib"] = round(rss_mib(ours.pid), 1)
        for c in (4, 16):
            result[f"maskcls_{c}_clients"] = load(url, photos, c, 200)
        # The reference for the soak: after 200 requests at 16 clients, whose micro-batches (up to 16 photos)
        # need more working memory than one client's batches of 1 (measured: 170 -> 352 MiB at the first burst).
        result["maskcls_rss_after_16_clients_mib"] = round(rss_mib(ours.pid), 1)
        result["maskcls_soak_16_clients"] = load(url, photos, 16, args.requests)
        result["maskcls_rss_after_soak_mib"] = round(rss_mib(ours.pid), 1)
        result["maskcls_rss_soak_ratio"] = round(result["maskcls_rss_after_soak_mib"]
                                                 / result["maskcls_rss_after_16_clients_mib"], 3)
    finally:
        ours.terminate()
    port = free_port()
    naive = start([sys.executable, str(ROOT / "bench" / "naive_server.py"), str(checkpoint_paths([args.run])[0]),
                   str(port)], port)
    url = f"http://127.0.0.1:{port}/predict"
    try:
        load(url, photos[:4], 1, 8)
        result["naive_one_client"] = load(url, photos, 1, 50)
        for c in (4, 16):
            result[f"naive_{c}_clients"] = load(url, photos, c, args.naive_requests)
    finally:
        naive.terminate()
    result["classifier_alone"] = classifier_alone(args.run, model, base)
    result["ratio_16_clients"] = round(result["maskcls_16_clients"]["per_s"] / result["naive_16_clients"]["per_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
