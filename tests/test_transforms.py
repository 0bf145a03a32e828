"""The eval transform without albumentations gives albumentations' pixels, and the ONNX predict path
imports neither torch nor albumentations.pytorch, and opens no socket, with both installed."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from classify.data.transforms import INTERPOLATIONS, build_transform

from .conftest import REPO, SAMPLES


@pytest.mark.parametrize("shape", [(256, 256), (100, 100), (64, 80), (300, 200), (32, 32)])
@pytest.mark.parametrize("interpolation", list(INTERPOLATIONS))
def test_the_eval_transform_gives_albumentations_resize_pixels(shape, interpolation):
    import albumentations as A

    img = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    want = A.Compose([A.Resize(64, 64, interpolation=INTERPOLATIONS[interpolation], area_for_downscale="image")])
    got = build_transform("base", 64, train=False, interpolation=interpolation)(image=img)["image"]
    assert got.dtype == np.uint8 and np.array_equal(got, want(image=img)["image"])


@pytest.mark.slow
def test_predict_with_an_onnx_model_imports_no_torch_and_opens_no_socket(sample_crops, tmp_path):
    pytest.importorskip("onnxscript")
    import torch  # noqa: F401 - installed here: the point is that predict does not import it

    from classify.training.config import TrainConfig
    from classify.deploy.export import export
    from classify.training.train import fit
    fit(TrainConfig(crops=str(sample_crops), out=str(tmp_path / "r"), epochs=1, img_size=32, workers=0, weights="none",
                    device="cpu", preset="none", val_ratio=0.25), warn=lambda m: None)
    export([tmp_path / "r"], tmp_path / "m.onnx")
    code = f"""
import socket, sys
def no_network(*a, **k):
    raise SystemExit("a socket was opened")
socket.socket.connect = socket.socket.connect_ex = no_network
socket.create_connection = socket.getaddrinfo = no_network
sys.argv = ["cli.py", "predict", {str(tmp_path / 'm.onnx')!r}, {str(SAMPLES / 'eval')!r}, "--out", {str(tmp_path / 's.csv')!r},
            "--crops", {str(tmp_path / 'ec')!r}]
import runpy
try:
    runpy.run_path("cli.py", run_name="__main__")
except SystemExit as e:
    if e.code not in (0, None):
        raise
bad = [m for m in ("torch", "albumentations", "albumentations.pytorch", "facenet_pytorch") if m in sys.modules]
print("IMPORTED", bad)
"""
    import os

    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "IMPORTED []" in r.stdout, r.stdout + r.stderr[-2000:]
    assert (tmp_path / "s.csv").read_text().count("\n") > 1
