"""Where `maskcls serve`'s time goes at 16 clients: per stage, ms of CPU per photo, and the micro-batches.

    python bench/serve_profile.py --model MODEL.onnx [--clients 16] [--requests 400] [--workdir DIR]

The server is `maskcls serve`'s own app (`classify.deploy.serve.create_app`, the request log on, as the
command runs it) in a child process whose stages are wrapped with timers: wall time, and the CPU time of
the thread that ran them (`time.thread_time`). Clients: bench/serve.py's load (one photo per request,
lone eval-style photos). Stages:

- read: the body read into memory and its multipart parse, on the event loop or a worker thread
- header checks (`pixels_of`), decode (`decode`: `load_rgb` of the bytes)
- detect (`MTCNNDetector.detect`, the fast and the relaxed pass), cut (`crop_square`), the JPEG round trip of
  each crop (encode + decode, so a model sees the pixels `predict` gives it), the subject choice (the rest of
  `crop_lone_photos`)
- prepare (uint8 crop to the model's input), the classifier (`OnnxModel.run`), answer + describe
- everything else: the process's CPU less the stages' (uvicorn's HTTP, FastAPI, JSON, the request log, the
  event loop, the micro-batcher)

Only the stages' own threads are timed: work inside OpenCV's or onnxruntime's thread pools counts in the
process's CPU (and so in "everything else") but not in the stage that asked for it.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def server(model: Path, port: int, lanes: int | None = None) -> None:
    """The app of `maskcls serve`, with timers around its stages and a /_stats route for this script."""
    import logging

    import uvicorn

    import preprocess.detector as D
    import preprocess.faces as F
    from classify.deploy import serve as S
    from classify.inference.onnx_model import OnnxModel

    stats = collections.defaultdict(lambda: [0, 0.0, 0.0])  # name -> [calls, wall s, thread cpu s]
    batches = collections.Counter()
    lock = threading.Lock()

    def timed(owner, name, label):
        f = getattr(owner, name)

        def g(*a, **k):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return f(*a, **k)
            finally:
                with lock:
                    s = stats[label]
                    s[0] += 1
                    s[1] += time.perf_counter() - t
                    s[2] += time.thread_time() - c
        setattr(owner, name, g)

    timed(S, "parse_upload", "read: multipart parse")
    timed(S, "pixels_of", "header checks")
    timed(S, "decode", "decode")
    timed(S.Engine, "predict", "engine (a micro-batch)")
    timed(D.MTCNNDetector, "detect", "detect")
    timed(F, "crop_square", "cut")
    timed(F, "encode_jpeg", "crop's JPEG round trip")
    timed(F, "decode_jpeg", "crop's JPEG round trip")
    timed(OnnxModel, "prepare", "prepare")
    timed(OnnxModel, "run", "classifier")
    timed(S, "answer", "answer + describe")
    timed(S.Engine, "describe", "answer + describe")
    timed(F, "crop_lone_photos", "crop_lone_photos")
    real_predict = S.Engine.predict

    def predict(self, images):
        with lock:
            batches[len(images)] += 1
        return real_predict(self, images)
    S.Engine.predict = predict

    if lanes is not None:
        S.LANES = lanes
        S.Engine.__init__.__defaults__ = (None, lanes)
    app = S.create_app(OnnxModel(model))
    handler = logging.StreamHandler(open(os.devnull, "w"))  # the request log is formatted, as serve does
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger("maskcls.serve").addHandler(handler)
    logging.getLogger("maskcls.serve").setLevel(logging.INFO)

    def threads_cpu() -> dict[str, float]:
        """CPU seconds by kind of thread, from /proc: the event loop (main thread), the worker threads
        (asyncio's executor: decode, the engine), and native pools (OpenCV's, onnxruntime's)."""
        names = {t.native_id: t.name for t in threading.enumerate()}
        tick = os.sysconf("SC_CLK_TCK")
        out = collections.Counter()
        for task in Path("/proc/self/task").iterdir():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            name = names.get(int(task.name), "")
            kind = ("event loop (HTTP, FastAPI, JSON, log)" if name == "MainThread" else
                    "worker threads (the timed stages)" if name.startswith("asyncio") else
                    "native pools (OpenCV, onnxruntime)")
            out[kind] += (int(fields[11]) + int(fields[12])) / tick
        return dict(out)

    @app.get("/_stats")
    async def _stats():
        with lock:
            return {"stages": {k: list(v) for k, v in stats.items()}, "batches": dict(batches),
                    "cpu": time.process_time(), "wall": time.perf_counter(), "threads": threads_cpu()}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--photos", type=int, default=105)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--client", default="lean", choices=["lean", "httpx"],
                    help="the load generator (bench/serve.py's): lean leaves the cores to the server")
    ap.add_argument("--lanes", type=int, default=None, help="micro-batches at once (default: serve's LANES)")
    ap.add_argument("--server", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.server:
        return server(args.model, args.server, args.lanes)
    import httpx

    from serve import free_port, load, start
    from workload import make_lone_workload, workdir

    base = workdir(args.workdir)
    make_lone_workload(base / "lone", args.photos)
    photos = sorted((base / "lone" / "images").iterdir())
    port = free_port()
    proc = start([sys.executable, __file__, "--model", str(args.model), "--server", str(port)]
                 + (["--lanes", str(args.lanes)] if args.lanes is not None else []), port)
    url = f"http://127.0.0.1:{port}"
    try:
        load(url + "/predict", photos[:16], args.clients, 32, args.client)  # warm up
        before = httpx.get(url + "/_stats").json()
        res = load(url + "/predict", photos, args.clients, args.requests, args.client)
        after = httpx.get(url + "/_stats").json()
    finally:
        proc.terminate()
        proc.wait()
    n = args.requests
    cpu, wall = after["cpu"] - before["cpu"], after["wall"] - before["wall"]
    print(f"{args.clients} {args.client} clients, {n} requests of one photo: {res['per_s']} requests/s, failed {res['failed']}, "
          f"p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms")
    print(f"server process: {cpu / n * 1000:.1f} ms of CPU per photo ({cpu / wall:.2f} cores busy of 2, the "
          "clients on the same cores)")
    print(f"{'stage':28s} {'calls':>6s} {'cpu ms/photo':>13s} {'wall ms/photo':>14s}")
    staged = 0.0
    outer = {"engine (a micro-batch)", "crop_lone_photos"}
    for k, (c1, w1, t1) in sorted(after["stages"].items(), key=lambda kv: -kv[1][2]):
        c0, w0, t0 = before["stages"].get(k, [0, 0.0, 0.0])
        print(f"{k:28s} {c1 - c0:6d} {(t1 - t0) / n * 1000:13.2f} {(w1 - w0) / n * 1000:14.2f}")
        if k not in outer:
            staged += t1 - t0
    print(f"{'everything else':28s} {'':6s} {(cpu - staged) / n * 1000:13.2f}")
    print("CPU by thread, ms per photo: " + "; ".join(
        f"{k} {(v - before['threads'].get(k, 0)) / n * 1000:.1f}" for k, v in after["threads"].items()))
    sizes = collections.Counter({int(k): v - before["batches"].get(k, 0) for k, v in after["batches"].items()})
    sizes = {k: v for k, v in sorted(sizes.items()) if v}
    mean = sum(k * v for k, v in sizes.items()) / max(1, sum(sizes.values()))
    print(f"micro-batches (photos: count): {sizes}; mean {mean:.1f} photos")


if __name__ == "__main__":
    main()
