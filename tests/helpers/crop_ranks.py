"""Crop under torchrun with the fake detector, rank 1 held back while rank 0 starts writing:

    torchrun --nproc-per-node 2 tests/helpers/crop_ranks.py RAW OUT

A rank that planned its share from the file system after rank 0 began writing crops would see other
work left than rank 0 saw, and some persons would be cropped by no rank.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import preprocess.crop as C  # noqa: E402
from classify.training.distributed import init_distributed  # noqa: E402
from tests.conftest import FakeDetector  # noqa: E402

if os.environ.get("RANK") == "1":
    plain = C._current

    def slow(*a, **k):
        time.sleep(0.5)
        return plain(*a, **k)
    C._current = slow

if __name__ == "__main__":
    d = init_distributed("cpu")
    res = C.crop_dataset(Path(sys.argv[1]), Path(sys.argv[2]), C.CropConfig(size=48, batch_size=7),
                         detector=FakeDetector(), rank=d.rank, world=d.world, barrier=d.barrier, broadcast=d.broadcast)
    if d.rank == 0:
        print(f"rank 0: {len(res.rows)} rows, {res.detected} detected", flush=True)
    d.close()
