"""The real detector on photos whose face boxes are known (synthetic composites of real faces)."""
import numpy as np
import pytest

from preprocess.detector import MTCNNDetector
from preprocess.subject import DEFAULT_PRIOR, choose_lone
from tests.synth import iou, person_photos, sources

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(11)
    out = []
    for k, src in enumerate(sources()):
        for stem, (img, box) in person_photos(src, rng, flip=bool(k % 2)).items():
            out.append((img, box))
    return out


def _largest(faces):
    """What a plain loop keeps: the largest, most confident face."""
    return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) * f.score) if faces else None


def _fast_hits(det, photos):
    """The crop stage's passes on lone photos: the fast pass, the relaxed one where it found nothing."""
    imgs = [p for p, _ in photos]
    found = det.detect(imgs)
    misses = [i for i, f in enumerate(found) if not f]
    for i, f in zip(misses, det.detect([imgs[i] for i in misses], relaxed=True)):
        found[i] = f
    chosen = []
    for faces, img in zip(found, imgs):
        c = choose_lone([(f.box, f.score, "ok", f.landmarks) for f in faces], img.shape[1], img.shape[0], DEFAULT_PRIOR)
        chosen.append(faces[c.index] if c.index is not None else None)
    return sum(1 for f, (_, box) in zip(chosen, photos) if f is not None and iou(f.box, box) >= 0.5), chosen


def test_fast_path_finds_faces_as_well_as_the_plain_mtcnn_loop(photos):
    from facenet_pytorch import MTCNN

    plain = MTCNN(device="cpu")
    plain_hits = 0
    for img, box in photos:
        boxes, _ = plain.detect(img)
        if boxes is not None and iou(np.asarray(list(boxes), float)[0], box) >= 0.5:
            plain_hits += 1
    fast_hits, found = _fast_hits(MTCNNDetector(device="cpu"), photos)
    assert fast_hits >= plain_hits, (fast_hits, plain_hits)
    assert fast_hits >= 0.9 * len(photos)
    # landmarks come back in the photo's pixels: the nose lies inside the box
    for f in found:
        if f is not None:
            (x1, y1, x2, y2), (nx, ny) = f.box, f.landmarks[2]
            assert x1 <= nx <= x2 and y1 <= ny <= y2


def test_lean_mtcnn_agrees_with_facenet_pytorch_on_full_size_photos(photos):
    """Same weights, same geometry: at the library's default settings the kept boxes nearly coincide."""
    from facenet_pytorch import MTCNN

    ref = MTCNN(device="cpu")
    ours = MTCNNDetector(device="cpu", detect_side=0, min_face=20 / 384)
    agree, same_verdict, n = [], 0, 0
    for img, _ in photos[::2]:
        rb, rp = ref.detect(img)
        mine = _largest(ours.detect([img])[0])
        n += 1
        same_verdict += (rb is None) == (mine is None)
        if rb is not None and mine is not None:
            rb, rp = np.asarray(list(rb), float), np.asarray(list(rp), float)
            k = int(np.argmax((rb[:, 2] - rb[:, 0]) * (rb[:, 3] - rb[:, 1]) * rp))
            agree.append(iou(rb[k], mine.box))
    # Resampling differs slightly (OpenCV's area resize vs torch's), so a borderline face can go either way.
    assert same_verdict >= 0.85 * n, (same_verdict, n)
    assert len(agree) >= 15 and np.median(agree) >= 0.9, agree


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_gpu_batches_give_the_cpu_boxes(photos):
    """The torch engine on CUDA against the same engine on the CPU (cuDNN may use TF32, so a borderline
    face may rarely flip), and against the OpenCV engine the CPU crop uses."""
    imgs = [p for p, _ in photos]
    gpu = [_largest(f) for f in MTCNNDetector(device="cuda").detect(imgs)]
    for ref, verdicts in (([_largest(f) for f in MTCNNDetector(device="cpu", engine="torch").detect(imgs)], 0.95),
                          ([_largest(f) for f in MTCNNDetector(device="cpu").detect(imgs)], 0.9)):
        assert sum((a is None) == (b is None) for a, b in zip(ref, gpu)) >= verdicts * len(imgs)
        ious = [iou(a.box, b.box) for a, b in zip(ref, gpu) if a is not None and b is not None]
        assert len(ious) >= 0.8 * len(imgs) and np.median(ious) >= 0.95


def test_the_shipped_onnx_nets_compute_what_facenet_pytorchs_nets_compute():
    """preprocess/nets/*.onnx (tools/export_mtcnn_onnx.py), run by OpenCV as the CPU crop runs them,
    against facenet-pytorch's own PNet/RNet/ONet with their shipped weights, on the same inputs."""
    import torch
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    from preprocess.mtcnn import OUTPUTS, CvNets

    cv = CvNets(max_batch=16)
    rng = np.random.default_rng(0)
    nets = {"pnet": PNet().eval(), "rnet": RNet().eval(), "onet": ONet().eval()}
    for name, shape in [("pnet", (3, 3, 41, 57)), ("pnet", (2, 3, 12, 12)), ("pnet", (1, 3, 256, 192)),
                        ("rnet", (37, 3, 24, 24)), ("onet", (5, 3, 48, 48))]:
        x = rng.uniform(-1, 1, shape).astype(np.float32)
        ours = cv._forward(name, x)
        with torch.no_grad():
            ref = nets[name](torch.from_numpy(x))
        assert len(ours) == len(ref) == len(OUTPUTS[name])
        for a, head, b in zip(ours, OUTPUTS[name], ref):
            assert a.shape == tuple(b.shape), (name, head)
            assert np.abs(a - b.numpy()).max() < 1e-4, (name, head)
        assert np.allclose(ours[-1].sum(1), 1, atol=1e-5)  # the probability head is a softmax


def test_the_nets_input_is_facenet_pytorchs_normalisation_for_every_pixel_value():
    """CvNets.load converts by a table (cv2.LUT); the nets must still see facenet-pytorch's
    (pixel - 127.5) * 0.0078125 in float32, bit for bit, for all 256 values in every channel."""
    from preprocess.mtcnn import CvNets

    img = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, axis=2)
    img[..., 1] = img[..., 1][::-1]  # channels differ, so a table applied to one channel only would show
    (got,) = CvNets.load(None, img[None])
    want = (img.astype(np.float32) - 127.5) * np.float32(0.0078125)
    assert got.dtype == np.float32 and got.shape == img.shape and np.array_equal(got, want)


def test_the_shipped_onnx_files_are_the_exported_ones():
    """export.json (written by the export script) names each file's hash: a file edited or replaced by
    hand, or an export not committed with its record, fails here."""
    import hashlib
    import json

    from preprocess.mtcnn import NETS_DIR, OUTPUTS

    record = json.loads((NETS_DIR / "export.json").read_text())
    assert set(record["sha256"]) == set(OUTPUTS)
    for name, digest in record["sha256"].items():
        assert hashlib.sha256((NETS_DIR / f"{name}.onnx").read_bytes()).hexdigest() == digest, name


def test_torch_engine_finds_the_faces_the_opencv_engine_finds(photos):
    """The GPU path's code (torch nets, grid_sample cuts), run on the CPU, against the CPU path."""
    imgs = [p for p, _ in photos[::2]]
    cpu = [_largest(f) for f in MTCNNDetector(device="cpu").detect(imgs)]
    tor = [_largest(f) for f in MTCNNDetector(device="cpu", engine="torch").detect(imgs)]
    both = [(a, b) for a, b in zip(cpu, tor) if a is not None and b is not None]
    assert sum((a is None) == (b is None) for a, b in zip(cpu, tor)) >= 0.9 * len(imgs)
    assert len(both) >= 0.8 * len(imgs)
    assert np.median([iou(a.box, b.box) for a, b in both]) >= 0.95


def test_the_cpu_crop_stage_never_imports_torch(tmp_path):
    """`import torch` costs ~1.8 s a process, a third of a 300-photo crop: the CPU path must not pay it."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import sys; from pathlib import Path; from preprocess import crop_dataset\n"
            f"res = crop_dataset(Path({str(REPO / 'data_samples' / 'train')!r}), Path({str(tmp_path / 'c')!r}))\n"
            "print(res.counts['ok'], 'torch' in sys.modules)")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # 'auto' must resolve to the CPU without asking torch
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ok, imported = out.stdout.split()
    assert int(ok) >= 50 and imported == "False"


def test_the_cheap_cuda_probe_respects_cuda_visible_devices(monkeypatch):
    from preprocess.runtime import cuda_driver_device_count, device_name

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cuda_driver_device_count() == 0 and device_name("cpu") == "cpu"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="needs CUDA: without a GPU both sides count 0, which proves nothing")
def test_the_cheap_cuda_probe_agrees_with_torch():
    import torch

    from preprocess.runtime import cuda_driver_device_count, device_name

    assert cuda_driver_device_count() == torch.cuda.device_count() > 0
    assert device_name("auto").startswith("cuda")


@pytest.mark.parametrize("engine", ["auto", "torch"])
def test_photos_too_small_for_any_face_are_no_face_not_an_error(engine, photos):
    det = MTCNNDetector(device="cpu", engine=engine)
    tiny = [np.zeros(s, np.uint8) for s in [(1, 1, 3), (8, 8, 3), (11, 30, 3), (13, 900, 3)]]
    found = det.detect(tiny + [photos[0][0]])  # in one call with a real photo, which is still found
    assert found[:4] == [[]] * 4 and iou(_largest(found[4]).box, photos[0][1]) >= 0.5


def test_an_opencv_that_cannot_load_the_nets_falls_back_to_torch_with_a_warning(photos, monkeypatch):
    import cv2

    def broken(*_):
        raise cv2.error("unsupported ONNX operator")

    monkeypatch.setattr(cv2.dnn, "readNetFromONNX", broken)
    det = MTCNNDetector(device="cpu")
    with pytest.warns(RuntimeWarning, match="detecting with torch on the CPU instead"):
        found = det.detect([photos[0][0]])
    assert det.engine == "torch" and iou(_largest(found[0]).box, photos[0][1]) >= 0.5
