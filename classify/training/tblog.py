"""Live TensorBoard logs of a training run (`tensorboard --logdir runs/`), when the optional
`tensorboard` package is installed (`pip install 'maskcls[tensorboard]'`).

Each epoch: the training losses per head, the validation loss, accuracy and macro F1 (18 classes and
per task), the learning rates, the attention model's task weights: the very numbers of metrics.csv,
under the same names. On the first epoch, a few validation crops as the model sees them. Without
the package, training runs unchanged and says so once.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


class RunLog:
    """TensorBoard event files in RUN/tensorboard (rank 0 only); every method is a no-op without tensorboard."""

    def __init__(self, out: Path, enabled: bool = True):
        self.writer = None
        self.note = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.note = ("TensorBoard logs are off: pip install 'maskcls[tensorboard]' to watch runs live "
                         "(tensorboard --logdir runs/)")
            return
        self.writer = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))

    def epoch(self, record: dict) -> None:
        """Every numeric value of a metrics.csv row, as a scalar at step = epoch."""
        if self.writer is None:
            return
        step = int(record["epoch"])
        for k, v in record.items():
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, float(v), step)
        self.writer.flush()

    def crops(self, images: np.ndarray, titles: list[str]) -> None:
        """A few validation crops (N x 3 x H x W uint8) with their true classes, once."""
        if self.writer is None or not len(images):
            return
        self.writer.add_images("validation crops", images, 0, dataformats="NCHW")
        self.writer.add_text("validation crops", "  \n".join(f"{i}: {t}" for i, t in enumerate(titles)), 0)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
