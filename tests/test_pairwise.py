"""A pairwise matrix of each command's behaviour-changing options on data_samples (issue 34, check b): every pair
of option values meets in at least one run (allpairspy). For every combination:

- exit 0, or exit 1 with one `error:` line;
- no traceback, and no library warning on the terminal (numpy, torch, sklearn, optuna: `SomethingWarning`);
- every number written (submission, probabilities, review list, summary.json, metrics.csv) is finite;
- where a checkpoint and its export both honour the options, they give the same classes.

The numbers of combinations and their time are printed (`pytest -s`) and in the session note.
"""
from __future__ import annotations

import csv
import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import SAMPLES

pytestmark = pytest.mark.slow
pytest.importorskip("allpairspy")
from allpairspy import AllPairs  # noqa: E402

FAST = ["--epochs", "1", "--img-size", "32", "--workers", "0", "--weights", "none", "--device", "cpu"]
LIBRARY_WARNING = re.compile(r"\b[A-Z]\w*Warning\b")


def _pairs(options: dict[str, list]) -> list[dict]:
    names = list(options)
    return [dict(zip(names, combo)) for combo in AllPairs([options[n] for n in names])]


def _check_outcome(res, what: str) -> bool:
    """True for exit 0; exit 1 must be one `error:` line. Never a traceback or a library warning."""
    out = res.stdout + res.stderr
    assert "Traceback" not in out, f"{what}: traceback\n{out[-3000:]}"
    assert not LIBRARY_WARNING.search(out), f"{what}: a library warning reached the terminal\n{out[-3000:]}"
    if res.returncode == 0:
        return True
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 1 and len(errors) == 1, f"{what}: exit {res.returncode}\n{out[-3000:]}"
    return False


def _finite_files(*paths: Path) -> None:
    for p in paths:
        if not p.is_file():
            continue
        text = p.read_text()
        if p.suffix == ".json":
            def walk(v):
                if isinstance(v, float):
                    assert math.isfinite(v), f"{p}: {v}"
                elif isinstance(v, dict):
                    for x in v.values():
                        walk(x)
                elif isinstance(v, list):
                    for x in v:
                        walk(x)
            walk(json.loads(text))
        else:
            for row in csv.reader(text.splitlines()):
                for cell in row:
                    assert cell.strip().lower() not in ("nan", "inf", "-inf"), f"{p}: {row}"


@pytest.fixture(scope="module")
def model(sample_crops, tmp_path_factory, cli_run):
    """One run on data_samples' crops (real MTCNN settings) and its export."""
    base = tmp_path_factory.mktemp("pairwise")
    res = cli_run("train", sample_crops, "--out", base / "run", "--model", "resnet18", "--preset", "none", *FAST)
    assert res.returncode == 0, res.stderr[-2000:]
    onnx = None
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        pass
    else:
        res = cli_run("export", base / "run", "--out", base / "m.onnx", "--crops", sample_crops)
        assert res.returncode == 0, res.stderr[-2000:]
        onnx = base / "m.onnx"
    res = cli_run("predict", base / "run", SAMPLES / "eval", "--out", base / "s.csv", "--crops", base / "eval_crops")
    assert res.returncode == 0, res.stderr[-2000:]  # the eval crops, for the combinations that predict crops
    return base, base / "run", onnx


def test_train_pairwise(sample_crops, tmp_path, cli_run):
    combos = _pairs({"model": ["resnet18", "attention", "mobilenet_v2"], "loss": ["ce", "wce", "smooth", "focal", "f1"],
                     "mix": ["none", "cutmix", "mixup"], "preset": ["none", "base", "strong"],
                     "sampler": ["none", "weighted"], "ema": ["0", "0.9"], "amp": ["off", "bf16"]})
    t0, ok = time.perf_counter(), 0
    for k, c in enumerate(combos):
        out = tmp_path / f"r{k}"
        args = ["train", sample_crops, "--out", out, *FAST] + [x for n, v in c.items() for x in (f"--{n}", v)]
        res = cli_run(*args, timeout=300)
        if _check_outcome(res, f"train {c}"):
            ok += 1
            _finite_files(out / "summary.json", out / "metrics.csv", out / "val_predictions.csv")
            assert (out / "best.pt").is_file()
        shutil.rmtree(out, ignore_errors=True)  # 43 runs of up to 230 MB each: checked, then gone
    print(f"train: {len(combos)} combinations, {ok} ran, {len(combos) - ok} refused, {time.perf_counter() - t0:.0f} s")
    assert ok >= len(combos) - 2  # bf16 on a CPU without it may be refused in one line; the rest must train


def _classes(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return [r["ans"] for r in csv.DictReader(f)]


def test_predict_pairwise_and_export_parity(model, sample_crops, tmp_path, cli_run):
    base, run, onnx = model
    combos = _pairs({"backend": ["ckpt", "onnx"] if onnx else ["ckpt"], "source": ["raw", "crops"],
                     "tta": ["1", "2"], "vote": ["soft", "hard"], "calibrate": ["--calibrate", "--no-calibrate"],
                     "review": ["none", "0.9"], "batch": ["1", "64"]})
    t0, ok, compared = time.perf_counter(), 0, 0
    done: dict[tuple, Path] = {}
    for k, c in enumerate(combos):
        src = SAMPLES / "eval" if c["source"] == "raw" else base / "eval_crops"
        sub, probs, review = tmp_path / f"s{k}.csv", tmp_path / f"p{k}.csv", tmp_path / f"v{k}.csv"
        args = ["predict", onnx if c["backend"] == "onnx" else run, src, "--out", sub, "--probs", probs,
                "--tta", c["tta"], "--vote", c["vote"], c["calibrate"], "--batch-size", c["batch"]]
        if c["source"] == "raw":
            args += ["--crops", base / "eval_crops"]  # crop (or reuse) into the test's folder, not ~/.cache
        if c["review"] != "none":
            args += ["--review", review, "--below", c["review"]]
        res = cli_run(*args, timeout=300)
        if not _check_outcome(res, f"predict {c}"):
            assert c["backend"] == "onnx" and c["tta"] != "1", res.stderr  # the one refusal: TTA on a graph
            continue
        ok += 1
        _finite_files(sub, probs, review)
        key = (c["source"], c["tta"], c["vote"], c["calibrate"])
        done.setdefault(key, sub)
        if c["backend"] == "onnx":  # the checkpoint with the same options: the same classes
            twin = tmp_path / f"twin{k}.csv"
            t = cli_run("predict", run, src, "--out", twin, "--tta", c["tta"], "--vote", c["vote"], c["calibrate"],
                        *(["--crops", base / "eval_crops"] if c["source"] == "raw" else []), timeout=300)
            assert t.returncode == 0, t.stderr[-2000:]
            assert _classes(twin) == _classes(sub), c
            compared += 1
    print(f"predict: {len(combos)} combinations, {ok} ran, {compared} checked against the checkpoint, "
          f"{time.perf_counter() - t0:.0f} s")
    assert ok >= len(combos) // 2 and (compared or not onnx)


def test_evaluate_and_pseudo_label_pairwise(model, sample_crops, tmp_path, cli_run):
    base, run, onnx = model
    t0, ran = time.perf_counter(), 0
    combos = _pairs({"backend": ["ckpt", "onnx"] if onnx else ["ckpt"], "tta": ["1", "2"], "vote": ["soft", "hard"],
                     "calibrate": ["--calibrate", "--no-calibrate"]})
    for k, c in enumerate(combos):
        m = onnx if c["backend"] == "onnx" else run
        res = cli_run("evaluate", m, sample_crops, "--tta", c["tta"], "--vote", c["vote"], c["calibrate"], timeout=300)
        if _check_outcome(res, f"evaluate {c}"):
            ran += 1
            said = "people the model trained on" in " ".join(res.stderr.split())
            assert said == (c["backend"] == "ckpt"), res.stderr  # an export carries no split to tell
            assert not re.search(r"\bnan\b", res.stdout)
    pl = _pairs({"backend": ["ckpt", "onnx"] if onnx else ["ckpt"], "vote": ["soft", "hard"],
                 "min_prob": ["0.05", "0.9"], "calibrate": ["--calibrate", "--no-calibrate"]})
    for k, c in enumerate(pl):
        out = tmp_path / f"pl{k}"
        m = onnx if c["backend"] == "onnx" else run
        res = cli_run("pseudo-label", m, SAMPLES / "eval", "--out", out, "--min-prob", c["min_prob"], "--vote",
                      c["vote"], c["calibrate"], "--crops", tmp_path / f"plc{k}", timeout=300)
        if _check_outcome(res, f"pseudo-label {c}"):
            ran += 1
            with open(out / "manifest.csv", newline="") as f:
                kept = list(csv.DictReader(f))
            assert all(float(c["min_prob"]) <= float(r["prob"]) < 1 for r in kept)  # a probability, never a share
    print(f"evaluate and pseudo-label: {len(combos) + len(pl)} combinations, {ran} ran, {time.perf_counter() - t0:.0f} s")
    assert ran >= len(combos) // 2 + len(pl) // 2


def test_crop_pairwise(model, tmp_path, cli_run):
    base, run, _ = model
    combos = _pairs({"size": ["64", "160"], "margin": ["0", "0.3"], "detect_side": ["0", "256"],
                     "pack": ["--pack", "--no-pack"], "prior": ["none", "run"]})
    t0, ran = time.perf_counter(), 0
    for k, c in enumerate(combos):
        out = tmp_path / f"c{k}"
        args = ["crop", SAMPLES / "eval", "--out", out, "--size", c["size"], "--margin", c["margin"], "--detect-side",
                c["detect_side"], c["pack"], "--device", "cpu"] + (["--prior", run] if c["prior"] == "run" else [])
        res = cli_run(*args, timeout=300)
        if _check_outcome(res, f"crop {c}"):
            ran += 1
            _finite_files(out / "manifest.csv")
            assert (out / "crops.npy").is_file() == (c["pack"] == "--pack")
    print(f"crop: {len(combos)} combinations, {ran} ran, {time.perf_counter() - t0:.0f} s")
    assert ran == len(combos)
