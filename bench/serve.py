"""`maskcls serve` under load against a naive handler (bench/naive_server.py: what community apps of this
task do), same model, same photos, this machine; and the classifier alone in onnxruntime (fp32, int8)
against torch eager.

    python bench/serve.py --run RUN [--photos 105] [--requests 2000] [--workdir DIR] [--client httpx,lean] [--root DIR]

RUN: a run folder trained on real-looking faces (e.g. bench/calibration.py's). Photos: lone eval-style
photos (bench/workload.py make_lone_workload). Reported: one client's latency p50/p99, requests/s at 1,
4 and 16 concurrent clients, failed requests over --requests at 16 clients, and the server's RSS after
100 requests (one client), after 200 at 16 clients, and after the --requests soak. Each load also reports the
CPU a request cost the clients (this process) and the server (from /proc).

Two load generators (`--client`): "httpx", a thread and an httpx.Client per client, as a Python user writes
one; it costs ~3.5-4 ms of CPU a request on these 2 cores, which the server then lacks. "lean", one asyncio
loop sending prebuilt requests on keep-alive connections, ~0.2 ms a request: the server's speed with the
cores to itself, as with clients on other machines. The ratio is given for each (BENCHMARKS §29).

The baseline takes its upload as FastAPI's `UploadFile`, which needs python-multipart (`pip install
python-multipart`; maskcls parses its uploads itself and does not).
"""
from __future__ import annotations

import argparse
import json
import os
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


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, photos: list[Path], clients: int, requests: int, client: str = "httpx",
         server_pid: int | None = None) -> dict:
    """`requests` single-photo requests from `clients` concurrent clients: requests/s, latencies, failures,
    and the CPU per request of the clients (this process) and of the server (`server_pid`).

    client "httpx": a thread per client, each an `httpx.Client` (what a Python user writes); "lean": one
    asyncio loop, a keep-alive connection per client, each request's bytes built once (a load generator that
    leaves the 2 cores to the server, as clients on other machines would)."""
    c0, s0 = time.process_time(), cpu_s(server_pid) if server_pid else 0.0
    t0 = time.perf_counter()
    lat, fails = (_load_httpx if client == "httpx" else _load_lean)(url, photos, clients, requests)
    secs = time.perf_counter() - t0
    out = {"clients": clients, "requests": requests, "client": client, "per_s": round(requests / secs, 2),
           "failed": fails, "p50_ms": round(1000 * float(np.percentile(lat, 50)), 1),
           "p99_ms": round(1000 * float(np.percentile(lat, 99)), 1),
           "client_cpu_ms_per_request": round(1000 * (time.process_time() - c0) / requests, 2)}
    if server_pid:
        out["server_cpu_ms_per_request"] = round(1000 * (cpu_s(server_pid) - s0) / requests, 2)
    return out


def _load_lean(url: str, photos: list[Path], clients: int, requests: int) -> tuple[list[float], int]:
    """HTTP/1.1 over asyncio streams: each photo's request (headers + multipart body) built once, read back
    by Content-Length. A request that fails (connection error, status other than 200) counts as failed
    and its connection is opened again."""
    import asyncio
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    boundary = "maskclsbenchboundary7f3a"
    reqs = []
    for p in photos:
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{p.name}\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + p.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        head = (f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: multipart/form-data; "
                f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        reqs.append(head + body)
    lat, fails = [], [0]
    counter = iter(range(requests))

    async def one_client():
        conn = None
        for k in counter:
            t = time.perf_counter()
            ok = False
            try:
                if conn is None:
                    conn = await asyncio.open_connection(u.hostname, u.port)
                reader, writer = conn
                writer.write(reqs[k % len(reqs)])
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                ok = status == 200
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                conn = None
            lat.append(time.perf_counter() - t)
            fails[0] += not ok
        if conn is not None:
            conn[1].close()

    async def run():
        await asyncio.gather(*(one_client() for _ in range(clients)))

    asyncio.run(run())
    return lat, fails[0]


def _load_httpx(url: str, photos: list[Path], clients: int, requests: int) -> tuple[list[float], int]:
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

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, fails[0]


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
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="run another checkout's cli.py as `maskcls serve` (e.g. a git worktree of an older commit)")
    ap.add_argument("--client", default="httpx,lean",
                    help="load generators, comma-separated (httpx, lean; the last one runs the soak)")
    args = ap.parse_args()
    base = workdir(args.workdir)
    make_lone_workload(base / "lone", args.photos)
    photos = sorted((base / "lone" / "images").iterdir())
    from classify.deploy.export import export
    from classify.inference.torch_backend import checkpoint_paths

    model = export([args.run], base / "model.onnx").path
    kinds = args.client.split(",")
    result = {}
    port = free_port()
    ours = start([sys.executable, str(args.root / "cli.py"), "serve", str(model), "--port", str(port)], port)
    url = f"http://127.0.0.1:{port}/predict"
    try:
        load(url, photos[:8], 1, 16)  # warm up
        result["maskcls_one_client"] = load(url, photos, 1, 100, server_pid=ours.pid)
        result["maskcls_rss_after_100_mib"] = round(rss_mib(ours.pid), 1)
        for kind in kinds:
            for c in (4, 16):
                result[f"maskcls_{c}_clients_{kind}"] = load(url, photos, c, 200, kind, ours.pid)
        # The reference for the soak: after 200 requests at 16 clients, whose micro-batches (up to 16 photos)
        # need more working memory than one client's batches of 1 (measured: 170 -> 352 MiB at the first burst).
        result["maskcls_rss_after_16_clients_mib"] = round(rss_mib(ours.pid), 1)
        result["maskcls_soak_16_clients"] = load(url, photos, 16, args.requests, kinds[-1], ours.pid)
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
        result["naive_one_client"] = load(url, photos, 1, 50, server_pid=naive.pid)
        for kind in kinds:
            for c in (4, 16):
                result[f"naive_{c}_clients_{kind}"] = load(url, photos, c, args.naive_requests, kind, naive.pid)
    finally:
        naive.terminate()
    result["classifier_alone"] = classifier_alone(args.run, model, base)
    for kind in kinds:
        result[f"ratio_16_clients_{kind}"] = round(result[f"maskcls_16_clients_{kind}"]["per_s"]
                                                   / result[f"naive_16_clients_{kind}"]["per_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
