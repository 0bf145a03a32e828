"""Shared fixtures: a fake face detector, synthetic raw folders, synthetic crops folders.

The fake detector finds "faces" drawn as bright squares, every square of a photo: a square brighter
than 200 is found by the first pass, one between 120 and 200 only by the relaxed pass, and a photo
without one has no face. Its score is 0.99 x min(1, brightness / 250).
So tests know every box and every status in advance, and run without MTCNN.
"""
from __future__ import annotations

import csv
import shutil
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest

from preprocess import labels as L
from preprocess.manifest import pack_crops
from preprocess.detector import Face
from preprocess.imageio import atomic_write_bytes, encode_jpeg
from preprocess.manifest import write_manifest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data_samples"


class FakeDetector:
    def __init__(self):
        self.settings = {"detector": "fake", "v": 1}
        self.calls = 0
        self.photos = 0

    def detect(self, images, relaxed=False):
        self.calls += 1
        self.photos += len(images)
        return [self._all(im, 120 if relaxed else 200) for im in images]

    @staticmethod
    def _all(im, level):
        grey = im.min(axis=2)
        n, lab, stats, _ = cv2.connectedComponentsWithStats((grey > level).astype(np.uint8), connectivity=4)
        faces = []
        for k in range(1, n):
            x, y, w, h, area = stats[k]
            if area >= 16:
                score = min(0.99, 0.99 * float(grey[lab == k].mean()) / 250)
                faces.append(Face(box=(float(x), float(y), float(x + w), float(y + h)), score=round(score, 4)))
        return sorted(faces, key=lambda f: -f.score)


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (bound and closed again before it returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photo(box=(140, 160, 260, 280), level=255, size=(384, 512), seed=0) -> np.ndarray:
    """A dark noisy 384x512 photo with a bright square 'face' at `box` (level 0: no face)."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = rng.integers(0, 90, size=(h, w, 3), dtype=np.uint8)
    if level:
        x1, y1, x2, y2 = box
        img[y1:y2, x1:x2] = level
    return img


def save_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = ".jpg" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    assert ok
    path.write_bytes(buf.tobytes())


def make_person(images: Path, folder: str, levels: dict | None = None, ext: str = ".jpg", box=(140, 160, 260, 280)):
    """Seven photos of one person; `levels` maps a stem to its face brightness (default 255)."""
    levels = levels or {}
    for k, stem in enumerate(L.MASK_FILES):
        save_rgb(images / folder / f"{stem}{ext}", photo(box, levels.get(stem, 255), seed=k))


@pytest.fixture
def fake_detector():
    return FakeDetector()


@pytest.fixture
def raw_train(tmp_path) -> Path:
    """A competition train folder: 3 people, one with a photo found only by the relaxed pass and one
    with a photo that has no face at all."""
    raw = tmp_path / "raw"
    images = raw / "images"
    make_person(images, "000001_female_Asian_45")
    make_person(images, "000002_male_Asian_61", levels={"mask3": 150})
    make_person(images, "000010-1_male_Asian_22", levels={"normal": 0}, ext=".png")
    with open(raw / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "gender", "race", "age", "path"])
        for folder in ("000001_female_Asian_45", "000002_male_Asian_61", "000010-1_male_Asian_22"):
            pid, g, race, age = folder.split("_")
            w.writerow([pid, g, race, age, folder])
    return raw


def pattern_crop(label: int, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A crop whose class is visible: background colour = mask status, stripe direction = gender,
    number of bright squares = age group; plus noise so no two are alike."""
    m, g, a = L.decode(label)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    img = np.empty((size, size, 3), np.uint8)
    img[:] = colours[m]
    step = size // 6
    for k in range(0, size, 2 * step):
        if g == 0:
            img[:, k:k + step] //= 2
        else:
            img[k:k + step, :] //= 2
    for j in range(a + 1):
        x = 4 + j * (size // 3)
        img[size // 2 - 4:size // 2 + 4, x:x + 8] = 255
    noise = rng.integers(-25, 26, size=img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def make_crops(out: Path, people: int = 36, shuffle_labels: bool = False, seed: int = 0, size: int = 48,
               ages=(22, 45, 70)) -> Path:
    """A crops folder (manifest + JPEG crops + crops.npy) of synthetic people with visible classes
    (their age group drawn at the boundary 60); person p is of gender p % 2 and age ages[(p // 2) % len(ages)]."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(people):
        gender, age = p % 2, ages[(p // 2) % len(ages)]
        for stem, mask in L.MASK_FILES.items():
            ag = L.age_group(age)
            label = L.encode(mask, gender, ag)
            crop_rel = f"crops/{p:04d}/{stem}.jpg"
            atomic_write_bytes(out / crop_rel, encode_jpeg(pattern_crop(label, rng, size)))
            rows.append({"image_id": f"{p:04d}/{stem}", "source": f"images/{p:04d}/{stem}.jpg", "crop": crop_rel,
                         "person_id": f"{p:04d}", "gender": gender, "race": "x", "age": age, "mask": mask,
                         "age_group": ag, "label": label, "status": "ok", "reason": "", "x1": 0.0, "y1": 0.0,
                         "x2": float(size), "y2": float(size), "score": 0.99, "width": size, "height": size})
    if shuffle_labels:
        perm = rng.permutation(len(rows))
        fields = ("gender", "age", "mask", "age_group", "label")
        shuffled = [{k: rows[j][k] for k in fields} for j in perm]
        for r, s in zip(rows, shuffled):
            r.update(s)
    write_manifest(out, rows, {"config": {"size": size}, "detector": {"detector": "synthetic"}})
    pack_crops(out, rows, size)
    return out


@pytest.fixture(scope="session")
def sample_crops(tmp_path_factory) -> Path:
    """data_samples/train cropped with the real MTCNN (once per session)."""
    from preprocess import CropConfig, crop_dataset

    out = tmp_path_factory.mktemp("sample_crops")
    crop_dataset(SAMPLES / "train", out, CropConfig(device="cpu"))
    return out


@pytest.fixture
def copy_tree():
    def copy(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst)
        return dst
    return copy


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory):
    """`cli_run(*args, cwd=REPO, timeout=600)` runs `python cli.py ARGS` as its own process, forked from a
    zygote that has imported maskcls's libraries once (tests/cli_zygote.py); returns a CompletedProcess
    with returncode, stdout and stderr as `subprocess.run(..., capture_output=True, text=True)` gives."""
    import json
    import subprocess
    import sys

    zygote = subprocess.Popen([sys.executable, str(REPO / "tests" / "cli_zygote.py")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    hello = json.loads(zygote.stdout.readline() or '{"ready": false, "why": "it ended at start"}')
    if not hello["ready"]:
        import warnings

        warnings.warn(f"cli zygote not used ({hello.get('why')}): each command starts its own interpreter")
    folder = tmp_path_factory.mktemp("cli_run")

    def run(*args, cwd=REPO, timeout=600):
        argv = [str(a) for a in args]
        if not hello["ready"]:
            return subprocess.run([sys.executable, str(REPO / "cli.py"), *argv], capture_output=True, text=True,
                                  cwd=cwd, timeout=timeout)
        out, err = folder / "stdout", folder / "stderr"
        zygote.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
                                       "timeout": timeout}) + "\n")
        zygote.stdin.flush()
        answer = zygote.stdout.readline()
        if not answer:
            raise RuntimeError(f"the cli zygote ended (exit {zygote.wait()}); run `python tests/cli_zygote.py` to see why")
        return subprocess.CompletedProcess([sys.executable, str(REPO / "cli.py"), *argv], json.loads(answer)["rc"],
                                           out.read_text(), err.read_text())

    yield run
    zygote.stdin.close()
    zygote.wait(timeout=60)
