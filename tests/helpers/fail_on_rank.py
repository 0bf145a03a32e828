"""Train under torchrun with a fault on one rank:

    torchrun --nproc-per-node 2 tests/helpers/fail_on_rank.py CROPS RUN MODE

MODE `epoch2-rank1`: rank 1 raises a TrainingError at the start of epoch 2, while rank 0 goes on into
DDP's all-reduce. `epoch2-rank0`: the same on rank 0. `resolve-elsewhere`: weights resolved on any rank
but 0 raise, so the run passes only if rank 0 alone resolves them. Prints `rank R: <error>`.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import classify.training.train as T  # noqa: E402
from classify.errors import TrainingError  # noqa: E402
import classify.models.weights as W  # noqa: E402
from classify.training.config import TrainConfig  # noqa: E402

rank, mode = os.environ.get("RANK"), sys.argv[3]
if mode.startswith("epoch2-rank") and rank == mode[-1]:
    plain = T.train_one_epoch

    def failing(t, loader, epoch, on_step=None):
        if epoch == 1:
            raise TrainingError(f"injected failure on rank {rank}")
        return plain(t, loader, epoch, on_step)
    T.train_one_epoch = failing
if mode == "resolve-elsewhere" and rank != "0":
    def resolve(*a, **k):
        raise AssertionError(f"weights resolved on rank {rank}")
    W.resolve = resolve

if __name__ == "__main__":
    try:
        T.fit(TrainConfig(crops=sys.argv[1], out=sys.argv[2], epochs=3, img_size=32, batch_size=8, workers=0,
                          weights="auto" if mode == "resolve-elsewhere" else "none", device="cpu", preset="none"),
              warn=lambda m: None)
    except TrainingError as e:
        print(f"rank {rank}: {e}", flush=True)
        sys.exit(3)
