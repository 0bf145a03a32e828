"""Train on a synthetic crops folder in a process a test can kill.

    python tests/helpers/train_run.py CROPS RUN EPOCHS
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from classify.training.train import TrainConfig, fit  # noqa: E402

FAST = dict(model="resnet18", img_size=32, batch_size=16, lr=1e-3, workers=0, weights="none", device="cpu",
            preset="base", val_ratio=0.25)

if __name__ == "__main__":
    fit(TrainConfig(crops=sys.argv[1], out=sys.argv[2], epochs=int(sys.argv[3]), **FAST), warn=lambda m: None)
