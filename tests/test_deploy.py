"""Put a model to work (issue 22): `maskcls export` gives the checkpoint's answers, an exported model
predicts without torch, and `maskcls serve` answers as `maskcls predict` does, to concurrent clients,
and turns every bad request into a 4xx line while staying up."""
from __future__ import annotations

import csv
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from classify.training.config import TrainConfig
from classify.inference.predictor import predict
from classify.training.train import fit
from tests.conftest import REPO, SAMPLES, free_port, make_crops

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.slow
FAST = dict(img_size=32, batch_size=32, workers=0, weights="none", device="cpu", preset="none", val_ratio=0.25)


def _export(cli_run, run, out, *args):
    res = cli_run("export", run, "--out", out, *args)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


@pytest.mark.parametrize("model", ["resnet18", "attention", "kfold"])
def test_export_gives_the_checkpoints_classes_and_probabilities(tmp_path, model, cli_run):
    from classify.inference.predictor import predict as predict_onnx  # the one predict, given an .onnx

    crops = make_crops(tmp_path / "c", people=12)
    kw = dict(folds=2, fold="all", model="resnet18") if model == "kfold" else dict(model=model)
    fit(TrainConfig(crops=str(crops), out=str(tmp_path / "r"), epochs=1, **FAST, **kw), warn=lambda m: None)
    res = _export(cli_run, tmp_path / "r", tmp_path / "m.onnx")
    assert "max probability difference" in res.stderr
    want = predict([tmp_path / "r"], crops, None, device="cpu", workers=0)
    got = predict_onnx([tmp_path / "m.onnx"], crops)
    assert (got.labels == want.labels).all() and np.abs(got.probs - want.probs).max() < 1e-4
    from classify.inference.onnx_model import OnnxModel

    from classify.checkpoint import load_checkpoint
    from classify.inference.torch_backend import checkpoint_paths

    exported = OnnxModel(tmp_path / "m.onnx")
    meta = exported.meta
    assert exported.img_size == 32 and len(meta["checkpoints"]) == (2 if model == "kfold" else 1)
    # one description: the export carries each checkpoint's card word for word
    assert meta["cards"] == [load_checkpoint(p)["card"] for p in checkpoint_paths([tmp_path / "r"])]
    assert len(meta["cards"][0]["classes"]) == 18 and all(len(c["sha256"]) == 64 for c in meta["checkpoints"])


def test_a_foreign_or_damaged_onnx_file_is_one_error_line(tmp_path, cli_run):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage" * 20)
    for name, words in (("other.onnx", "not one `maskcls export` wrote"), ("bad.onnx", "not an ONNX model onnxruntime can run")):
        res = cli_run("predict", tmp_path / name, SAMPLES / "eval", "--out", tmp_path / "s.csv", timeout=120)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == 1 and len(lines) == 1 and words in " ".join(lines[0].split()), res.stderr


@pytest.fixture(scope="module")
def sample_model(sample_crops, tmp_path_factory, cli_run):
    """A model trained on data_samples' real crops (real MTCNN settings and face prior), and its export."""
    base = tmp_path_factory.mktemp("deploy")
    fit(TrainConfig(crops=str(sample_crops), out=str(base / "r"), model="resnet18", epochs=1, **FAST), warn=lambda m: None)
    _export(cli_run, base / "r", base / "m.onnx")
    want = predict([base / "r"], SAMPLES / "eval", base / "want.csv", device="cpu", workers=0, cache=base / "cache")
    return base, want


def test_predict_with_an_exported_model_runs_where_torch_cannot_be_imported(sample_model):
    base, want = sample_model
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
            f"sys.argv = ['maskcls', 'predict', {str(base / 'm.onnx')!r}, {str(SAMPLES / 'eval')!r}, '--out', "
            f"{str(base / 'onnx.csv')!r}, '--probs', {str(base / 'onnx_probs.csv')!r}, '--crops', {str(base / 'cache2')!r}]\n"
            f"sys.path.insert(0, {str(REPO)!r}); import cli; cli.app()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (base / "onnx.csv").read_text() == (base / "want.csv").read_text()
    with open(base / "onnx_probs.csv", newline="") as f:
        probs = np.array([[float(r[f"p{k}"]) for k in range(18)] for r in csv.DictReader(f)])
    assert np.abs(probs - want.probs).max() < 1e-4



@pytest.fixture(scope="module")
def server(sample_model):
    base, want = sample_model
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "serve", str(base / "m.onnx"), "--port", str(port),
                             "--max-bytes", "3000000", "--max-files", "4"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("maskcls serve did not come up: " + proc.communicate()[1][-2000:])
    yield url, want
    proc.terminate()
    proc.wait(timeout=30)


def test_served_answers_equal_predict_for_concurrent_clients(server):
    import httpx

    url, want = server
    photos = sorted((SAMPLES / "eval" / "images").iterdir())
    by_id = {iid: (int(y), p) for iid, y, p in zip(want.image_ids, want.labels, want.probs)}
    answers, errors = {}, []

    def client(k):
        try:
            with httpx.Client(timeout=120) as c:
                for p in photos[k::4]:
                    r = c.post(url + "/predict", files=[("file", (p.name, p.read_bytes(), "image/jpeg"))])
                    assert r.status_code == 200, r.text
                    answers[p.name] = r.json()["predictions"][0]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert set(answers) == {p.name for p in photos}
    for name, a in answers.items():
        y, p = by_id[name]
        assert a["class"] == y and np.abs(np.array(a["probs"]) - p).max() < 1e-5, name
        assert a["filename"] == name and len(a["box"]) == 4 and set(a["tasks"]) == {"mask", "gender", "age"}
    several = httpx.post(url + "/predict", files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in photos[:3]],
                         timeout=120).json()["predictions"]
    assert [a["filename"] for a in several] == [p.name for p in photos[:3]]  # upload order


def test_two_lanes_never_share_a_detector_and_answer_as_one_lane(sample_model, monkeypatch):
    """serve's Engine runs two micro-batches at once, each with a detector of its own (an OpenCV net is not
    safe to share between threads). Four threads hammering one engine: no detector is ever entered twice at
    once, and every answer equals the one-lane engine's."""
    from concurrent.futures import ThreadPoolExecutor

    import preprocess.detector as D
    from classify.deploy.serve import Engine
    from classify.inference.onnx_model import OnnxModel
    from preprocess.imageio import load_rgb

    base, _ = sample_model
    made, clashes, real = [], [], D.build_detector

    def guarded(*a, **k):
        det, busy = real(*a, **k), threading.Lock()
        inner = det.detect

        def detect(images, relaxed=False):
            if not busy.acquire(blocking=False):
                clashes.append(det)
                return inner(images, relaxed=relaxed)
            try:
                return inner(images, relaxed=relaxed)
            finally:
                busy.release()
        det.detect = detect
        made.append(det)
        return det

    monkeypatch.setattr(D, "build_detector", guarded)
    model = OnnxModel(base / "m.onnx")
    photos = [load_rgb(p) for p in sorted((SAMPLES / "eval" / "images").iterdir())]
    one = Engine(model, lanes=1).predict(photos)
    two = Engine(model, lanes=2)
    assert two.lanes == 2 and len(made) == 3 and made[1] is not made[2]
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(two.predict, [photos] * 8))
    assert not clashes
    for run in runs:
        assert [a["class"] for a in run] == [a["class"] for a in one]
        assert [a["box"] for a in run] == [a["box"] for a in one]
        assert np.abs(np.array([a["probs"] for a in run]) - np.array([a["probs"] for a in one])).max() < 1e-6


def test_each_answer_names_the_square_its_crop_was_cut_from(server):
    """The page drew each answer's crop as the face box x 1.6, a guess at the crop margin, and the schema called
    the face box 'the crop'. Each answer now carries the square the model's crop was cut from: cut from the photo
    (edges replicated) and resized, it gives predict's crop of the same photo."""
    import cv2
    import httpx

    from preprocess.imageio import load_photo, read_crop

    url, want = server
    crop_of = {r["image_id"]: want.crops / r["crop"] for r in want.rows}
    for photo in sorted((SAMPLES / "eval" / "images").iterdir())[:4]:
        a = httpx.post(url + "/predict", files=[("file", (photo.name, photo.read_bytes(), "image/jpeg"))],
                       timeout=120).json()["predictions"][0]
        x0, y0, x1, y1 = a["crop"]
        bx0, by0, bx1, by1 = a["box"]
        assert x1 - x0 == y1 - y0 and x0 <= bx0 and y0 <= by0 and x1 >= bx1 and y1 >= by1  # a square around the face
        img = load_photo(photo)[0]
        pad = max(0, -x0, -y0, x1 - img.shape[1], y1 - img.shape[0])
        img = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        expected = read_crop(crop_of[photo.name])
        size = expected.shape[0]
        cut = cv2.resize(img[y0 + pad:y1 + pad, x0 + pad:x1 + pad], (size, size),
                         interpolation=cv2.INTER_AREA if x1 - x0 > size else cv2.INTER_LINEAR)
        assert np.abs(cut.astype(int) - expected).mean() < 2.0, photo.name  # the same pixels, but for JPEG's loss


def test_a_model_that_has_not_learned_says_so_in_every_served_answer(server, sample_model):
    """predict warns that a model has not learned a task; serve answered the same model's photos with classes
    and probabilities and no word of it. Each /predict answer and /health now carry the card's caution."""
    import httpx

    from classify.inference.card import cautions
    from classify.inference.onnx_model import OnnxModel

    url, _ = server
    said = cautions(OnnxModel(sample_model[0] / "m.onnx").cards)
    assert said and "has not learned" in said[0]  # one epoch on 8 sample people with invented labels
    photo = sorted((SAMPLES / "eval" / "images").iterdir())[0]
    r = httpx.post(url + "/predict", files=[("file", (photo.name, photo.read_bytes(), "image/jpeg"))], timeout=120)
    assert r.status_code == 200 and r.json()["caution"] == " ".join(said)
    assert httpx.get(url + "/health", timeout=10).json()["caution"] == " ".join(said)


def test_a_model_that_has_not_learned_mask_raises_no_bare_mask_alarm(server, sample_model):
    """Each answer of a mask worn incorrectly or not at all carries a `warning` (the page shows it as an alarm
    under the photo). From a model that has not learned mask it read 'no mask' as if that were known."""
    import httpx

    from classify.inference.onnx_model import OnnxModel

    url, _ = server
    assert any("mask" in c.unlearned for c in OnnxModel(sample_model[0] / "m.onnx").cards)
    photos = sorted((SAMPLES / "eval" / "images").iterdir())
    answers = [a for k in range(0, len(photos), 4) for a in httpx.post(
        url + "/predict", files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in photos[k:k + 4]],
        timeout=120).json()["predictions"]]
    warned = [a for a in answers if a["tasks"]["mask"]["label"] != "wear"]
    assert warned, [a["name"] for a in answers]  # the weak model answers some photo with an unworn mask
    for a in answers:
        if a in warned:
            assert "has not learned mask: this says nothing yet" in a["warning"], a
        else:
            assert "warning" not in a, a


def test_every_bad_request_is_a_4xx_line_and_the_server_stays_up(server, tmp_path):
    import httpx

    from tests.test_imageio import _png_header_only

    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    url, _ = server
    jpeg = sorted((SAMPLES / "eval" / "images").iterdir())[0].read_bytes()
    one = lambda name, data: [("file", (name, data, "image/jpeg"))]  # noqa: E731
    cases = [
        ("not an image", dict(files=one("notes.jpg", b"hello, world" * 10)), 400, "not a photo in a format"),
        ("empty", dict(files=one("empty.jpg", b"")), 400, "empty file"),
        ("truncated", dict(files=one("cut.jpg", jpeg[: len(jpeg) // 3])), 400, "cut.jpg"),
        ("bomb", dict(files=one("bomb.png", (tmp_path / "bomb.png").read_bytes())), 400, "400 MP, over the 40 MP limit"),
        ("too big", dict(files=one("big.jpg", b"\xff" * 3_100_000)), 413, "over the 3000000-byte limit"),
        ("too many", dict(files=one("a.jpg", jpeg) * 5), 400, "at most 4 a request"),
        ("wrong field", dict(files=[("photo", ("a.jpg", jpeg, "image/jpeg"))]), 400, "no field 'file'"),
        ("not multipart", dict(content=b"{}", headers={"content-type": "application/json"}), 415, "multipart/form-data"),
    ]
    for what, kw, status, words in cases:
        r = httpx.post(url + "/predict", timeout=60, **kw)
        assert r.status_code == status and words in r.json()["error"], (what, r.status_code, r.text)
        assert "\n" not in r.json()["error"], what
    r = httpx.get(url + "/predict", timeout=10)
    assert r.status_code == 405 and "error" in r.json()
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"


def test_hostile_photos_get_their_own_4xx_and_other_clients_their_answers(server, tmp_path):
    """A 1 x 30000 PNG once failed every request of its micro-batch with a 500; a non-photo format reached
    Pillow's other decoders; 16 small PNGs could decode to 2 GB. Each is now its own 4xx, decided from the
    headers, while a normal client beside them gets its answer."""
    import io
    import threading

    import httpx
    from PIL import Image

    def png(w, h):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (200, 180, 160)).save(buf, format="PNG")
        return buf.getvalue()

    url, want = server
    jpeg_path = sorted((SAMPLES / "eval" / "images").iterdir())[0]
    normal = []

    def client():
        for _ in range(3):
            normal.append(httpx.post(url + "/predict", files=[("file", (jpeg_path.name, jpeg_path.read_bytes(),
                                                                         "image/jpeg"))], timeout=120))

    t = threading.Thread(target=client)
    t.start()
    ico = io.BytesIO()
    Image.new("RGB", (64, 64)).save(ico, format="ICO")
    cases = [("thin", [("thin.png", png(1, 30000))], 400, "too small or too thin to hold a face"),
             ("ico", [("x.ico", ico.getvalue())], 400, "not a photo in a format maskcls reads"),
             ("pixels", [(f"{k}.png", png(4000, 4000)) for k in range(4)], 413, "MP a request may hold")]
    for what, files, status, words in cases * 2:
        r = httpx.post(url + "/predict", files=[("file", (n, d, "image/png")) for n, d in files], timeout=120)
        assert r.status_code == status and words in r.json()["error"], (what, r.status_code, r.text)
    t.join()
    assert [r.status_code for r in normal] == [200] * 3
    y = int(want.labels[want.image_ids.index(jpeg_path.name)])
    assert all(r.json()["predictions"][0]["class"] == y for r in normal)
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
    page = httpx.get(url + "/", timeout=10).text
    assert "<script" in page and "http://" not in page and "https://" not in page  # nothing from the internet


def test_evaluate_and_pseudo_label_take_an_exported_model_as_they_take_its_checkpoint(sample_model, sample_crops, tmp_path):
    from classify.inference.evaluate import evaluate
    from classify.inference.pseudo import pseudo_label
    from preprocess.manifest import read_manifest

    base, _ = sample_model
    a, b = evaluate([base / "m.onnx"], sample_crops), evaluate([base / "r"], sample_crops, device="cpu", workers=0)
    assert a["scores"] == b["scores"] and a["confusion"] == b["confusion"]
    assert a["ece_after"] == pytest.approx(b["ece_after"], abs=1e-4)
    for name, model in (("onnx", base / "m.onnx"), ("ckpt", base / "r")):
        pseudo_label([model], SAMPLES / "eval", tmp_path / name, min_prob=0.01, cache=tmp_path / f"c_{name}",
                     device="cpu", **({} if name == "onnx" else {"workers": 0}))  # an .onnx refuses --workers
    rows = {n: {r["image_id"]: r["label"] for r in read_manifest(tmp_path / n)} for n in ("onnx", "ckpt")}
    assert rows["onnx"] == rows["ckpt"] and rows["onnx"]


def test_int8_export_reports_the_quantised_graphs_own_difference(tmp_path, cli_run):
    """It once printed the fp32 graph's difference (2.7e-07) while 7.1% of top classes changed; and
    onnxruntime's quantiser (root-logger WARNING lines) and torch's export (a UserWarning about the
    attention model's stored weights) wrote over our output."""
    from classify.deploy.export import export

    crops = make_crops(tmp_path / "c", people=12)
    fit(TrainConfig(crops=str(crops), out=str(tmp_path / "r"), epochs=2, **FAST | dict(model="attention")),
        warn=lambda m: None)
    fp32 = export([tmp_path / "r"], tmp_path / "f.onnx")
    res = _export(cli_run, tmp_path / "r", tmp_path / "q.onnx", "--int8")
    assert "int8 on 21 validation photos" in res.stderr
    assert "WARNING" not in res.stderr and "Warning" not in res.stderr, res.stderr
    int8 = export([tmp_path / "r"], tmp_path / "q2.onnx", int8=True)
    assert int8.checked == fp32.checked and fp32.parity < 1e-4 < int8.parity
