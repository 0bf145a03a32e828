"""The baseline a user would write: a plain loop over MTCNN(device='cpu') with default settings.

    python bench/plain_crop.py RAW OUT [DEVICE]     (DEVICE: cpu by default; cuda for the GPU comparison)

Per photo: PIL open, detect, crop the best (largest) box as a square with the same margin as
maskcls (0.3 of the box side on each side), resize to 256, save JPEG. Writes OUT/boxes.json.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from facenet_pytorch import MTCNN
from PIL import Image


def main(raw: Path, out: Path, device: str = "cpu", margin: float = 0.3, size: int = 256) -> None:
    mtcnn = MTCNN(device=device)
    boxes = {}
    for path in sorted((raw / "images").rglob("*.jpg")):  # a train layout (person folders) or an eval one
        img = Image.open(path).convert("RGB")
        with torch.no_grad():
            found, _ = mtcnn.detect(img)
        rel = path.relative_to(raw).as_posix()
        if found is None:
            boxes[rel] = None
            continue
        x1, y1, x2, y2 = np.asarray(found[0], dtype=float)
        boxes[rel] = [x1, y1, x2, y2]
        side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        crop = img.crop((int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2)))
        dst = out / "crops" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        crop.resize((size, size)).save(dst.with_suffix(".jpg"), quality=95)
    (out / "boxes.json").write_text(json.dumps(boxes))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:4])
