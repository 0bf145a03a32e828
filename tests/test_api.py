"""maskcls as a library (issue 36): `classify.load(path).predict(...)` gives, for the same photos as files, as
arrays and as PIL images, the probabilities `maskcls predict --probs` writes (<= 1e-6): one path, not two. An
exported model loads and predicts through the API without torch; `classify.train` and `preprocess.crop` take the
commands' options with their checks."""
from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, SAMPLES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(sample_crops, tmp_path_factory, cli_run):
    import classify

    base = tmp_path_factory.mktemp("api")
    summary = classify.train(sample_crops, base / "run", model="resnet18", epochs=1, img_size=64, workers=0,
                             weights="none", device="cpu", warn=lambda m: None)
    assert summary["epochs"] == 1
    res = cli_run("predict", base / "run", SAMPLES / "eval", "--out", base / "sub.csv", "--probs", base / "probs.csv",
                  "--crops", base / "cache", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    with open(base / "probs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    want = {r["ImageID"]: np.array([float(r[f"p{k}"]) for k in range(18)]) for r in rows}
    return base, want


def test_files_arrays_and_pil_images_give_the_commands_probabilities(trained):
    from PIL import Image

    import classify
    from preprocess.imageio import load_photo

    base, want = trained
    files = sorted((SAMPLES / "eval" / "images").iterdir())[:6]
    model = classify.load(base / "run", device="cpu")
    assert model.card.classes[0] == "wear/male/<30" and model.card.img_size == 64
    by_file = model.predict(files)
    arrays = [load_photo(f) for f in files]
    arrays = [a[0] if isinstance(a, tuple) else a for a in arrays]
    by_array = model.predict(arrays)
    by_pil = model.predict([Image.fromarray(a) for a in arrays])
    for f, a, b, c in zip(files, by_file, by_array, by_pil):
        assert np.abs(a.probs - want[f.name]).max() <= 1e-6, f.name  # the command's --probs (8 decimals)
        assert np.abs(a.probs - b.probs).max() <= 1e-6 and np.abs(a.probs - c.probs).max() <= 1e-6
        assert a.cls == b.cls == c.cls and a.box == pytest.approx(b.box) and a.status == b.status
        assert a.name == model.card.classes[a.cls] and set(a.tasks) == {"mask", "gender", "age"}
        assert a.tasks["mask"]["label"] == a.name.split("/")[0]
    folder = model.predict(SAMPLES / "eval" / "images")  # a folder: every photo, sorted by name
    assert [p.source for p in folder][:6] == [str(f) for f in files]
    # A model that has not learned a task: `maskcls predict` says so; the API's answers carried no word of it.
    assert model.cautions and model.cautions == [model.card.caution]  # 1 epoch on 8 people with invented labels
    assert all(a.warnings[-1] == model.card.caution for a in by_file + by_array + folder)


def test_the_api_refuses_what_the_command_refuses_in_one_line(trained, tmp_path):
    import classify
    from classify.errors import ConfigError

    base, _ = trained
    model = classify.load(base / "run", device="cpu")
    with pytest.raises(ConfigError, match="--tta 9: must be 1..4"):
        model.predict(SAMPLES / "eval" / "images", tta=9)
    with pytest.raises(ConfigError, match="is float64"):
        model.predict(np.zeros((64, 64, 3)))
    with pytest.raises(ConfigError, match="unknown option"):
        classify.train(base, tmp_path / "r", epoch=3)
    with pytest.raises(ConfigError, match="--lr -1"):
        classify.train(base, tmp_path / "r", lr=-1)


def test_an_exported_model_predicts_through_the_api_without_torch(trained, cli_run):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    base, want = trained
    res = cli_run("export", base / "run", "--out", base / "m.onnx")
    assert res.returncode == 0, res.stderr[-2000:]
    files = sorted((SAMPLES / "eval" / "images").iterdir())[:3]
    code = ("import sys, json; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1])\n"
            "import classify\n"
            "m = classify.load(sys.argv[2])\n"
            "print(json.dumps([a.probs.tolist() for a in m.predict(sys.argv[3:])]))\n"
            "assert 'torch' not in {k for k, v in sys.modules.items() if v is not None}\n")
    out = subprocess.run([sys.executable, "-c", code, str(REPO), str(base / "m.onnx"), *map(str, files)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    for f, p in zip(files, got):
        assert np.abs(np.array(p) - want[f.name]).max() < 1e-4  # onnxruntime vs torch: float32 rounding


def test_crop_photos_takes_the_commands_options_and_checks(tmp_path, fake_detector):
    import preprocess
    from preprocess.runtime import OptionError
    from tests.conftest import make_person

    make_person(tmp_path / "raw" / "images", "000001_female_Asian_45")
    (tmp_path / "raw" / "train.csv").write_text("id,gender,race,age,path\n000001,female,Asian,45,000001_female_Asian_45\n")
    with pytest.raises(OptionError, match="unknown option"):
        preprocess.crop_photos(tmp_path / "raw", tmp_path / "c", sizee=64)
    with pytest.raises(OptionError, match="--size 8: must be in 32..4096"):
        preprocess.crop_photos(tmp_path / "raw", tmp_path / "c", size=8, detector=fake_detector)
    res = preprocess.crop_photos(tmp_path / "raw", tmp_path / "c", size=64, device="cpu", detector=fake_detector)
    assert len(res.rows) == 7 and res.counts["ok"] == 7


def test_import_classify_loads_nothing_heavy():
    """`import classify` is lazy (BENCHMARKS §19: as fast as an empty interpreter): nothing until used."""
    code = "import sys, classify; print(sorted(m for m in ('torch', 'numpy', 'cv2', 'PIL', 'onnxruntime') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr
