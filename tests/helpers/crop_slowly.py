"""Run the crop stage with a slow fake detector, so a test can kill it at a random point.

    python tests/helpers/crop_slowly.py RAW OUT
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from preprocess import CropConfig, crop_dataset  # noqa: E402
from tests.conftest import FakeDetector  # noqa: E402


class SlowDetector(FakeDetector):
    def detect(self, images, relaxed=False):
        time.sleep(0.03 * len(images))
        return super().detect(images, relaxed)


if __name__ == "__main__":
    crop_dataset(Path(sys.argv[1]), Path(sys.argv[2]), CropConfig(size=48, batch_size=7, workers=2),
                 detector=SlowDetector())
