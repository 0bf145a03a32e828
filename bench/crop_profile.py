"""Where `maskcls crop`'s time goes: per stage, in process, wall time and the CPU time of the thread that ran it.

    python bench/crop_profile.py RAW OUT        (e.g. RAW = /tmp/bw/raw, made by bench/crop.py)

`crop_dataset` with the defaults on the CPU, its stages wrapped with timers: decode (`_load`: read, decode,
digest), detection (`MTCNNDetector.detect` and inside it the three nets, the candidate cuts, NMS), the crop
written (`_write_crop`: cut, JPEG encode, atomic write), the pack (crops.npy). Thread CPU counts only the
thread that called: OpenCV's own pool threads (the nets, large resizes) show in the process's CPU alone.
Run from the checkout to measure (it imports that checkout's preprocess).
"""
from __future__ import annotations

import collections
import os
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())
WALL, CPU, CALLS = collections.defaultdict(float), collections.defaultdict(float), collections.Counter()
LOCK = threading.Lock()


def wrap(owner, name: str, label: str) -> None:
    """Replace owner.name by a timed call (wall time and the calling thread's CPU time)."""
    f = getattr(owner, name)

    def timed(*a, **k):
        t, c = time.perf_counter(), time.thread_time()
        try:
            return f(*a, **k)
        finally:
            with LOCK:
                WALL[label] += time.perf_counter() - t
                CPU[label] += time.thread_time() - c
                CALLS[label] += 1
    setattr(owner, name, timed)


def main(raw: Path, out: Path) -> None:
    t0 = time.perf_counter()
    import preprocess.crop as C
    import preprocess.detector as D
    import preprocess.mtcnn as M
    imports = time.perf_counter() - t0
    for owner, name, label in [
            (C, "_load", "decode (read, decode, digest)"), (C, "_write_crop", "crop written (cut, encode, write)"),
            (C, "detect_and_choose", "detect + choose the subject"), (D.MTCNNDetector, "detect", "detect"),
            (M.CvNets, "_forward", "nets' forward (all three)"), (M.CvNets, "pnet", "P-Net (pyramid resize + forward)"),
            (M.CvNets, "rnet", "R-Net (cuts + forward)"), (M.CvNets, "onet", "O-Net (cuts + forward)"),
            (M, "_cut", "candidate cuts"), (M.CvNets, "load", "float conversion"), (M, "nms", "NMS"),
            (C, "pack_crops", "pack (crops.npy)"), (C, "write_manifest", "manifest"),
            (C, "compact_journal", "journal"), (C, "discover", "discover")]:
        wrap(owner, name, label)
    shutil.rmtree(out, ignore_errors=True)
    t, c = time.perf_counter(), time.process_time()
    res = C.crop_dataset(raw, out, C.CropConfig(device="cpu"))
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    n = len(res.rows)
    print(f"imports {imports * 1000:.0f} ms; crop_dataset {wall:.2f} s for {n} photos = {wall / n * 1000:.2f} ms a "
          f"photo; process CPU {cpu / n * 1000:.2f} ms a photo ({cpu / wall:.2f} cores); statuses {res.counts}")
    print(f"  {'stage':36s} {'wall ms/photo':>13s} {'thread CPU ms/photo':>20s} {'calls':>6s}")
    for k in sorted(WALL, key=lambda k: -CPU[k]):
        print(f"  {k:36s} {WALL[k] / n * 1000:13.2f} {CPU[k] / n * 1000:20.2f} {CALLS[k]:6d}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
