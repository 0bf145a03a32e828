"""Train under torchrun with a loss that turns NaN on rank 1 only, at its 3rd step.

    torchrun --nproc-per-node 2 tests/helpers/nan_on_one_rank.py CROPS RUN

Every rank must stop at that step with the NaN error; without the ranks agreeing, rank 0 would wait
forever in DDP's gradient all-reduce for a rank that has stopped.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import classify.training.train as T  # noqa: E402
from classify.errors import TrainingError  # noqa: E402
from tests.helpers import nan_at_call  # noqa: E402

T.make_loss = nan_at_call(T.make_loss, 3, when=lambda: os.environ.get("RANK") == "1")
if __name__ == "__main__":
    try:
        T.fit(T.TrainConfig(crops=sys.argv[1], out=sys.argv[2], epochs=2, img_size=32, batch_size=8, workers=0,
                            weights="none", device="cpu", preset="none"), warn=lambda m: None)
    except TrainingError as e:
        print(f"rank {os.environ.get('RANK')}: {e}", flush=True)
        if os.environ.get("RANK") == "1":
            time.sleep(3)  # torchrun ends the other ranks when one exits: give rank 0 the time to speak
        sys.exit(3)
