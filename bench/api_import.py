"""What `import classify` and loading an exported model through the API cost (issue 36).

    python bench/api_import.py [--repeat 7] [--workdir DIR]

Each figure is the median wall time of a fresh interpreter (`python -c ...`) over --repeat runs, against the same
interpreter doing nothing (`python -c pass`) in the same run: `import classify`; `import classify` and
`classify.load(model.onnx)`; and the same load followed by one photo's prediction. Each run also reports whether
torch was imported (it must not be, for an .onnx). The model is a 1-epoch resnet18 run on data_samples' crops,
exported by `maskcls export`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from workload import workdir  # noqa: E402


def timed(code: str, repeat: int) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(repeat):
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        times.append(time.perf_counter() - t)
        assert res.returncode == 0, res.stderr[-2000:]
        out = res.stdout.strip()
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    base = workdir(args.workdir)
    onnx = base / "m.onnx"
    if not onnx.is_file():
        from classify.deploy.export import export
        from classify.training.train import TrainConfig, fit
        from preprocess import CropConfig, crop_dataset
        from tests.conftest import SAMPLES

        crops = base / "c"
        crop_dataset(SAMPLES / "train", crops, CropConfig(device="cpu"))  # real MTCNN settings: it can crop eval photos
        fit(TrainConfig(crops=str(crops), out=str(base / "r"), model="resnet18", img_size=64, epochs=1, workers=0,
                        weights="none", device="cpu", preset="none"), warn=lambda m: None)
        export([base / "r" / "best.pt"], onnx)
    from tests.conftest import SAMPLES

    photo = sorted((SAMPLES / "eval" / "images").iterdir())[0]
    torch_in = "print('torch' in {k for k, v in sys.modules.items() if v is not None})"
    rows = {
        "python -c pass (baseline)": "pass",
        "import classify": f"import sys; import classify; {torch_in}",
        "import classify; classify.load(model.onnx)": f"import sys, classify; classify.load({str(onnx)!r}); {torch_in}",
        "... and predict one photo": (f"import sys, classify; m = classify.load({str(onnx)!r}); "
                                      f"m.predict({str(photo)!r}, detector=None); {torch_in}"),
        "import torch (for scale)": "import torch",
    }
    res = {}
    for name, code in rows.items():
        secs, out = timed(code, args.repeat)
        res[name] = {"median_s": round(secs, 3), "torch_imported": out.splitlines()[-1] if out else ""}
        print(f"{name:45s} {secs * 1000:8.0f} ms  torch imported: {res[name]['torch_imported'] or '-'}", flush=True)
    (base / "api_import.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
