"""The real detector on photos whose face boxes are known (synthetic composites of real faces)."""
import numpy as np
import pytest

from preprocess.detector import MTCNNDetector, detect_two_pass, pick_face
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


def _fast_hits(det, photos):
    found = [hit and hit[0] for hit in detect_two_pass(det, [p for p, _ in photos])]  # the crop stage's passes
    return sum(1 for f, (_, box) in zip(found, photos) if f is not None and iou(f.box, box) >= 0.5), found


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
        mine = ours.detect([img])[0]
        n += 1
        same_verdict += (rb is None) == (mine is None)
        if rb is not None and mine is not None:
            rb = np.asarray(list(rb), float)
            k = pick_face(rb, np.asarray(list(rp), float), None)
            agree.append(iou(rb[k], mine.box))
    # Resampling differs slightly (grid_sample vs area), so a borderline face can go either way.
    assert same_verdict >= 0.85 * n, (same_verdict, n)
    assert len(agree) >= 15 and np.median(agree) >= 0.9, agree


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_gpu_batches_give_the_cpu_boxes(photos):
    cpu = MTCNNDetector(device="cpu").detect([p for p, _ in photos])
    gpu = MTCNNDetector(device="cuda").detect([p for p, _ in photos])
    for a, b in zip(cpu, gpu):
        assert (a is None) == (b is None)
        if a is not None:
            assert iou(a.box, b.box) > 0.95
