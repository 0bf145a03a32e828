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
        ours.set_seed(seed)  # a loader batch's path: into a slot of an N x H x W x 3 batch
        batch = np.zeros((3, size, size, 3), np.uint8)
        ours.into(ro, batch[1])
        assert np.array_equal(batch[1], want) and not batch[0].any() and not batch[2].any(), f"into, seed {seed}"
        ours.set_seed(seed)
        box = ours.box(*shape)
        seen.add(box)
        flips += ours._rng.random() < 0.5
    assert len(seen) > (1 if shape != (40, 300) else 0)  # random boxes (one central box for the thin photo)
    assert 40 < flips < 110  # about half flipped


def test_a_slot_the_resize_cannot_write_is_refused():
    """cv2.resize given a dst it cannot use allocates a new array and leaves dst as it was: a batch slot would
    keep stale pixels, silently."""
    from classify.data.transforms import resize_into

    img = np.zeros((50, 60, 3), np.uint8)
    for bad in (np.zeros((32, 32), np.uint8), np.zeros((32, 32, 3), np.float32), np.zeros((3, 32, 32, 3), np.uint8)[:, 0]):
        with pytest.raises(ValueError, match="cannot resize"):
            resize_into(img, bad, 1)


@pytest.mark.parametrize("preset,train,synth", [("base", True, 0.0), ("base", True, 1.0), ("base", False, 0.0),
                                                ("strong", True, 0.0)])
@pytest.mark.parametrize("workers", [0, 1])
def test_loader_batches_built_in_place_equal_the_stacked_items(sample_crops, preset, train, synth, workers):
    """make_loader's batches (CropDataset.__getitems__ writes each image into its slot of one channels-last
    batch, in a worker's shared memory) hold exactly the items `ds[key]` gives, stacked: same pixels (the
    flip, the box, the synthetic mask), labels and manifest indices, in the sampler's order, the last batch
    short. The strong preset has no `into` and goes through the stack."""
    import torch

    from classify.data.dataset import CropDataset, load_rows
    from classify.inference.engine import EpochOrder, make_loader

    _, rows = load_rows(sample_crops)
    ds = CropDataset(sample_crops, rows, build_transform(preset, 64, train=train), seed=3, synth_mask=synth)
    order = list(range(len(ds)))[::-1]
    loader = make_loader(ds, 5, workers, torch.device("cpu"), sampler=EpochOrder(order, epoch=2))
    seen, synthetic = [], 0
    for x, y, idx in loader:
        keys = [(i, 2) for i in order[len(seen):len(seen) + len(idx)]]
        items = [ds[k] for k in keys]
        assert x.shape == (len(keys), 3, 64, 64) and x.dtype == torch.uint8
        assert x.is_contiguous(memory_format=torch.channels_last) == (preset == "base")  # built in place
        assert torch.equal(x, torch.stack([it[0] for it in items]))
        assert torch.equal(y, torch.stack([it[1] for it in items])) and y.dtype == torch.long
        assert idx.tolist() == [it[2] for it in items]
        synthetic += sum(int(a) != rows[k[0]]["label"] for a, k in zip(y, keys))
        seen += keys
    assert len(seen) == len(ds) and len(ds) % 5  # a short last batch was among them
    assert (synthetic > 0) == (synth > 0)  # the synthetic masks went through the in-place path too


def test_a_held_batch_is_never_rewritten_and_a_released_one_is_reused(sample_crops):
    """In the training process (no workers) batches are written into buffers the dataset reuses (a fresh
    4.8 MB batch costs ~650 page faults). A batch someone still holds, as a tensor, a view or a numpy
    array, must keep its pixels while later batches are built; one nobody holds is written again."""
    import torch

    from classify.data.dataset import CropDataset, load_rows
    from classify.inference.engine import EpochOrder, make_loader

    _, rows = load_rows(sample_crops)
    ds = CropDataset(sample_crops, rows, build_transform("base", 48, train=True), seed=5)
    order = list(range(len(ds)))
    loader = make_loader(ds, 4, 0, torch.device("cpu"), sampler=EpochOrder(order, epoch=1))
    held = []  # every batch kept, in three forms, while all later batches are built
    for k, (x, _, _) in enumerate(loader):
        held.append(x if k % 3 == 0 else x[:, :, 8:] if k % 3 == 1 else x.numpy())
    assert len(held) > 4  # more batches than the pool keeps buffers
    for k, h in enumerate(held):
        keys = [(i, 1) for i in order[4 * k:4 * k + 4]]
        want = torch.stack([ds[key][0] for key in keys])
        got = torch.as_tensor(h)
        assert torch.equal(got, want if k % 3 != 1 else want[:, :, 8:]), f"batch {k} was overwritten"

    del held, h, got, x
    full = len(order) // 4
    for k, (x, _, _) in enumerate(loader):  # each batch dropped before the next is built: a kept buffer again
        if k < full:
            assert any(x.data_ptr() == a.ctypes.data for a in ds._pool._arrays), f"batch {k} in a new buffer"


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
