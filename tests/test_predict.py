"""predict: parity with validation, order and completeness of the submission, TTA and ensembles."""
import csv
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from classify.inference.card import ModelCard
from classify.checkpoint import load_checkpoint, save_checkpoint
from classify.errors import CheckpointError
from classify.models.nets import create_model, model_kwargs, register_model
from classify.inference.predictor import predict
from classify.training.train import TrainConfig, fit
from classify.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from preprocess import CropConfig
from preprocess.manifest import read_manifest
from tests.conftest import SAMPLES, photo, save_rgb


class FlipSymmetric(nn.Module):
    """Logits from per-channel means and vertical profiles only: exactly invariant to a horizontal flip."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Identity()
        self.head = nn.Linear(3 + 3 * 32, 18)

    def forward(self, x):
        rows = x.mean(dim=3).flatten(1)  # mean over width: unchanged by a mirror
        return {"label": self.head(torch.cat([x.mean(dim=(2, 3)), rows], 1))}


@pytest.fixture
def flip_symmetric_model():
    """Registered for one test only, so registry-wide tests do not see it."""
    from classify.models import nets as models

    register_model("test_flip_symmetric")(FlipSymmetric)
    yield "test_flip_symmetric"
    models._REGISTRY.pop("test_flip_symmetric")


def make_ckpt(path, name="resnet18", seed=0, img_size=32, crop_size=48):
    torch.manual_seed(seed)
    kwargs = model_kwargs(name)
    model = create_model(name, **kwargs)
    card = ModelCard(name, kwargs, img_size, "base", "bilinear", IMAGENET_MEAN, IMAGENET_STD, amp="off",
                     crop={"config": asdict(CropConfig(size=crop_size)), "detector": {"detector": "fake"}})
    save_checkpoint(path, {"card": card.to_dict(), "model_state": model.state_dict(), "config": {"amp": False, "old": 60},
                           "epoch": 0})
    return path


@pytest.fixture
def eval_raw(tmp_path):
    """An eval folder: info.csv lists 6 photos (one unreadable, one missing) in a non-sorted order."""
    raw = tmp_path / "eval"
    names = ["f.jpg", "b.jpg", "broken.jpg", "a.png", "gone.jpg", "c.jpg"]
    for k, n in enumerate(names):
        if n == "broken.jpg":
            (raw / "images").mkdir(parents=True, exist_ok=True)
            (raw / "images" / n).write_bytes(b"\xff\xd8\xff\xe0 truncated")
        elif n != "gone.jpg":
            save_rgb(raw / "images" / n, photo(box=(100 + 10 * k, 150, 230 + 10 * k, 290), seed=k))
    (raw / "info.csv").write_text("ImageID,ans\n" + "".join(f"{n},0\n" for n in names))
    return raw


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_submission_has_every_info_row_in_order_and_warns_about_unreadable(eval_raw, tmp_path, fake_detector):
    ck = make_ckpt(tmp_path / "m.pt")
    pred = predict([ck], eval_raw, tmp_path / "sub.csv", probs_out=tmp_path / "p.csv", cache=tmp_path / "cache",
                   device="cpu", workers=0, detector=fake_detector)
    sub = _read(tmp_path / "sub.csv")
    assert [r["ImageID"] for r in sub] == [r["ImageID"] for r in _read(eval_raw / "info.csv")]
    assert all(0 <= int(r["ans"]) < 18 for r in sub)
    probs = _read(tmp_path / "p.csv")
    assert len(probs) == 6 and np.allclose([sum(float(r[f"p{k}"]) for k in range(18)) for r in probs], 1, atol=1e-6)
    warned = " ".join(pred.warnings)
    assert "broken.jpg" in warned and "gone.jpg" in warned


def test_tta_changes_nothing_for_a_flip_symmetric_model_and_averages_views_otherwise(eval_raw, tmp_path, fake_detector,
                                                                                   flip_symmetric_model):
    sym = make_ckpt(tmp_path / "sym.pt", name=flip_symmetric_model)
    kw = dict(cache=tmp_path / "cache", device="cpu", workers=0, detector=fake_detector)
    one = predict([sym], eval_raw, **kw).probs
    two = predict([sym], eval_raw, tta=2, **kw).probs
    assert np.allclose(one, two, atol=1e-6) and not np.allclose(one, one.mean(0), atol=1e-4)
    # a model that is not symmetric: tta=2 is the mean of the crop's and the mirrored crop's probabilities
    res = make_ckpt(tmp_path / "r.pt", seed=3)
    plain = predict([res], eval_raw, **kw)
    tta = predict([res], eval_raw, tta=2, **kw).probs
    assert not np.allclose(plain.probs, tta, atol=1e-6)
    from classify.checkpoint import load_checkpoint
    from classify.inference.torch_backend import load_model
    from classify.data.transforms import build_transform, normalize
    from preprocess.imageio import read_crop
    model = load_model(load_checkpoint(res), torch.device("cpu"))
    tf = build_transform("base", 32, train=False)
    row = plain.rows[0]
    x = normalize(torch.from_numpy(tf(image=read_crop(plain.crops / row["crop"]))["image"]).permute(2, 0, 1)[None])
    with torch.no_grad():
        manual = (model(x)["label"].softmax(-1) + model(torch.flip(x, dims=[3]))["label"].softmax(-1)) / 2
    assert np.allclose(tta[0], manual[0].numpy(), atol=1e-5)


def test_an_ensemble_averages_the_probabilities_of_its_checkpoints(eval_raw, tmp_path, fake_detector):
    a, b = make_ckpt(tmp_path / "a.pt", seed=1), make_ckpt(tmp_path / "b.pt", name="attention", seed=2)
    kw = dict(cache=tmp_path / "cache", device="cpu", workers=0, detector=fake_detector)
    pa, pb = predict([a], eval_raw, **kw).probs, predict([b], eval_raw, **kw).probs
    both = predict([a, b], eval_raw, tmp_path / "sub.csv", **kw)
    assert np.allclose(both.probs, (pa + pb) / 2, atol=1e-7)
    assert [int(r["ans"]) for r in _read(tmp_path / "sub.csv")] == both.probs.argmax(1).tolist()


def test_foreign_checkpoint_is_a_clear_error(eval_raw, tmp_path):
    torch.save({"model": "something else"}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a maskcls checkpoint"):
        predict([tmp_path / "foreign.pt"], eval_raw, device="cpu")


@pytest.mark.slow
def test_predict_on_validation_photos_reproduces_val_predictions(sample_crops, tmp_path):
    """Train on real crops (MTCNN), then predict the validation photos from raw files laid out as an
    eval folder: predict must crop them the same way and give the same probabilities."""
    run = tmp_path / "run"
    fit(TrainConfig(crops=str(sample_crops), out=str(run), model="resnet18", epochs=1, img_size=64, batch_size=16,
                    weights="none", device="cpu", workers=0, seed=5, val_ratio=0.3), warn=lambda m: None)
    val = {r["image_id"]: r for r in _read(run / "val_predictions.csv")}
    rows = {r["image_id"]: r for r in read_manifest(sample_crops)}
    # person_box photos need their person's other photos, which an eval folder does not group: skip those.
    chosen = [i for i in val if rows[i]["status"] in ("ok", "relaxed")]
    assert len(chosen) >= 0.8 * len(val) and len(chosen) >= 7
    raw = tmp_path / "eval"
    (raw / "images").mkdir(parents=True)
    names = []
    for k, iid in enumerate(chosen):
        src = SAMPLES / "train" / rows[iid]["source"]
        name = f"{k:03d}{src.suffix}"
        shutil.copy(src, raw / "images" / name)
        names.append(name)
    (raw / "info.csv").write_text("ImageID,ans\n" + "".join(f"{n},0\n" for n in names))
    pred = predict([run / "best.pt"], raw, tmp_path / "sub.csv", cache=tmp_path / "cache", device="cpu", workers=0,
                   calibrate=False)  # val_predictions.csv holds the raw probabilities (best.pt's temperature aside)
    expected = np.array([[float(val[i][f"p{k}"]) for k in range(18)] for i in chosen])
    assert pred.labels.tolist() == [int(val[i]["pred"]) for i in chosen]
    assert np.abs(pred.probs - expected).max() <= 1e-5


def test_checkpoints_from_differently_cropped_data_are_not_mixed(eval_raw, tmp_path, fake_detector):
    from classify.checkpoint import load_checkpoint, save_checkpoint

    a = make_ckpt(tmp_path / "a.pt")
    b = load_checkpoint(make_ckpt(tmp_path / "b.pt"))
    b["card"] = b["card"] | {"crop": dict(b["card"]["crop"], key="another-key")}
    save_checkpoint(tmp_path / "b.pt", {k: v for k, v in b.items() if k not in ("format", "version")})
    with pytest.raises(CheckpointError, match="different settings"):
        predict([a, tmp_path / "b.pt"], eval_raw, device="cpu", detector=fake_detector, cache=tmp_path / "cache")


def test_predict_pins_the_mmap_threshold_so_freed_activations_go_back(tmp_path):
    """glibc raises its mmap threshold when a mapped block is freed, so a CNN's next 1-32 MiB buffers come from
    the heap and stay resident after they are freed (predict's memory drifted by hundreds of MiB, BENCHMARKS
    §21). After steady_malloc an 8 MiB block freed three times leaves nothing resident; without it, 8 MiB."""
    import subprocess
    import sys
    import textwrap

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt: Linux only")
    script = textwrap.dedent(f"""
        import ctypes, os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from preprocess.runtime import steady_malloc
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        def anon():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) // 1024
        pinned = steady_malloc() if sys.argv[1] == "pin" else False
        size, before = 8 << 20, anon()
        for _ in range(3):
            p = libc.malloc(size); ctypes.memset(p, 1, size); libc.free(p)
        print(pinned, anon() - before)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = {mode: subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, env=env,
                                check=True).stdout.split() for mode in ("pin", "plain")}
    assert out["pin"][0] == "True" and int(out["pin"][1]) <= 1
    assert out["plain"][0] == "False" and int(out["plain"][1]) >= 7  # the bug this guards against, seen here


def test_evaluate_names_crops_cut_otherwise_than_the_training_crops(tmp_path):
    """predict warned when its crops were cut with other settings than the model's training crops; evaluate
    scored such a folder (say crop --size 64 against training's 256) in silence, as if its score were the model's."""
    import json

    from classify.inference.evaluate import evaluate
    from tests.conftest import make_crops

    crops = make_crops(tmp_path / "c", people=4, size=48)
    ckpt = load_checkpoint(make_ckpt(tmp_path / "m.pt"))
    ckpt["card"]["crop"] = dict(ckpt["card"]["crop"], key="trained-key")
    save_checkpoint(tmp_path / "m.pt", {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    meta = json.loads((crops / "crops.json").read_text())
    for key, warned in (("trained-key", False), ("other-key", True)):
        (crops / "crops.json").write_text(json.dumps(meta | {"key": key}))
        said = [w for w in evaluate([tmp_path / "m.pt"], crops, device="cpu", workers=0)["warnings"]
                if "was cropped with other settings" in w]
        assert bool(said) == warned, said
    assert said[0] == (f"{crops} was cropped with other settings than the training crops (key other-key vs trained-key): "
                       "these scores may be worse than validation said; crop its raw photos again as the training crops "
                       "were (`maskcls crop RAW --out CROPS --size 48 --margin 0.3 --detect-side 256 --min-face 0.3`)")


def test_photos_without_a_face_found_are_counted_and_named(eval_raw, tmp_path, fake_detector):
    """predict answered photos in which no face was found (noise, a landscape) with a class each, in silence."""
    (eval_raw / "images" / "noise.jpg").parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    save_rgb(eval_raw / "images" / "noise.jpg", (rng.random((512, 384, 3)) * 150).astype(np.uint8))  # under 200: no face
    with open(eval_raw / "info.csv", "a") as f:
        f.write("noise.jpg,0\n")
    pred = predict([make_ckpt(tmp_path / "m.pt")], eval_raw, tmp_path / "sub.csv", cache=tmp_path / "cache",
                   device="cpu", workers=0, detector=fake_detector)
    status = {r["image_id"]: r["status"] for r in pred.rows}
    guessed = [i for i in pred.image_ids if status[i] in ("prior_box", "person_box", "no_face")]
    assert "noise.jpg" in guessed and "a.png" not in guessed
    (said,) = [w for w in pred.warnings if "no face found" in w]
    assert said.startswith(f"{len(guessed)} of 7 photos: no face found, so each answer reads the crop where a face "
                           "should be") and f"noise.jpg ({status['noise.jpg']})" in said
    assert said.endswith(f"(every photo's status: {pred.crops / 'manifest.csv'})")
