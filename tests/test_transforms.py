"""The eval transform and the `base` training transform without albumentations give albumentations'
pixels, and the ONNX predict path imports neither torch nor albumentations.pytorch, and opens no
socket, with both installed."""
from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

from classify.data.transforms import INTERPOLATIONS, CropFlip, build_transform

from .conftest import REPO, SAMPLES


@pytest.mark.parametrize("shape", [(256, 256), (100, 100), (64, 80), (300, 200), (32, 32)])
@pytest.mark.parametrize("interpolation", list(INTERPOLATIONS))
def test_the_eval_transform_gives_albumentations_resize_pixels(shape, interpolation):
    import albumentations as A

    img = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    want = A.Compose([A.Resize(64, 64, interpolation=INTERPOLATIONS[interpolation], area_for_downscale="image")])
    got = build_transform("base", 64, train=False, interpolation=interpolation)(image=img)["image"]
    assert got.dtype == np.uint8 and np.array_equal(got, want(image=img)["image"])


@pytest.mark.parametrize("shape,size", [((256, 256), 224), ((160, 160), 128), ((200, 150), 96), ((64, 64), 112),
                                        ((40, 300), 32)])
@pytest.mark.parametrize("interpolation", list(INTERPOLATIONS))
def test_the_base_training_transform_is_albumentations_crop_and_flip_pixel_for_pixel(shape, size, interpolation):
    """CropFlip replaces A.Compose([RandomResizedCrop, HorizontalFlip]) for speed: under the same per-sample seed
    it must draw the same box and flip and give the same pixels (a changed draw order, rounding or crop origin
    would move the augmentation, and with it the accuracy measured in BENCHMARKS §5). (40, 300) is too thin for
    any draw to fit: the central fallback."""
    import albumentations as A

    img = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ref = A.Compose([A.RandomResizedCrop((size, size), scale=(0.6, 1.0), ratio=(0.85, 1.18),
                                         interpolation=INTERPOLATIONS[interpolation]), A.HorizontalFlip(p=0.5)])
    ours = build_transform("base", size, train=True, interpolation=interpolation)
    assert isinstance(ours, CropFlip)
    flips = 0
    seen = set()
    for seed in range(150):
        ref.set_random_state(np.random.default_rng(seed), random.Random(seed))
        ours.set_seed(seed)
        got, want = ours(image=img)["image"], ref(image=img)["image"]
        assert got.shape == (size, size, 3) and got.dtype == np.uint8
        assert np.array_equal(got, want), f"seed {seed}"
        ours.set_seed(seed)  # the loader's path: straight to 3 x H x W planes, from a read-only input
        ro = img.copy()
        ro.flags.writeable = False
        assert np.array_equal(ours.planes(ro), want.transpose(2, 0, 1)), f"planes, seed {seed}"
        ours.set_seed(seed)
        box = ours.box(*shape)
        seen.add(box)
        flips += ours._rng.random() < 0.5
    assert len(seen) > (1 if shape != (40, 300) else 0)  # random boxes (one central box for the thin photo)
    assert 40 < flips < 110  # about half flipped


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
