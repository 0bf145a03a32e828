"""maskcls report: the CSV numbers agree with the manifest and the run, and the page shows every figure."""
import csv
import re

import numpy as np
import pytest

from classify.study.report import report
from classify.training.train import TrainConfig, fit
from preprocess import CropConfig, crop_dataset
from preprocess.manifest import read_manifest
from tests.conftest import make_person


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_report_numbers_match_the_manifest_and_the_run(tmp_path, fake_detector):
    raw = tmp_path / "raw"
    for p in range(12):
        make_person(raw / "images", f"{p:06d}_{'male' if p % 2 else 'female'}_Asian_{[22, 45, 70][p % 3]}",
                    levels={"normal": 0} if p == 3 else ({"mask2": 150} if p == 5 else None))
    (raw / "images" / "000003_male_Asian_22" / "mask5.jpg").write_text("broken")
    crops = tmp_path / "crops"
    crop_dataset(raw, crops, CropConfig(size=48), detector=fake_detector)
    run = tmp_path / "run"
    fit(TrainConfig(crops=str(crops), out=str(run), epochs=2, img_size=32, workers=0, weights="none",
                    device="cpu", val_ratio=0.34), warn=lambda m: None)
    out = tmp_path / "report"
    index = report(crops, out, run=run)

    rows = read_manifest(crops)
    counts = np.bincount([r["label"] for r in rows if r["label"] >= 0], minlength=18)
    assert [int(r["photos"]) for r in _csv(out / "class_counts.csv")] == counts.tolist()
    people = [len({r["person_id"] for r in rows if r["label"] == k}) for k in range(18)]
    assert [int(r["people"]) for r in _csv(out / "class_counts.csv")] == people
    tasks = {(r["task"], r["value"]): int(r["photos"]) for r in _csv(out / "task_counts.csv")}
    assert tasks["mask", "wear"] == sum(r["mask"] == 0 for r in rows)
    assert tasks["gender", "female"] == sum(r["gender"] == 1 for r in rows)
    assert tasks["age group", ">=60"] == sum(r["age_group"] == 2 for r in rows)
    task_people = {(r["task"], r["value"]): int(r["people"]) for r in _csv(out / "task_counts.csv")}
    assert task_people["gender", "female"] == 6 and task_people["mask", "not wear"] == 12
    assert sum(int(r["photos"]) for r in _csv(out / "ages.csv")) == len(rows)
    assert sum(int(r["people"]) for r in _csv(out / "ages.csv")) == 12
    fallbacks = _csv(out / "fallbacks.csv")
    assert {(f["image_id"], f["status"]) for f in fallbacks} == \
           {(r["image_id"], r["status"]) for r in rows if r["status"] != "ok"}
    assert {f["status"] for f in fallbacks} == {"relaxed", "person_box", "unreadable"}
    grid = _csv(out / "crops_grid.csv")
    labels = {r["image_id"]: r["label"] for r in rows}
    assert all(labels[g["image_id"]] == int(g["label"]) for g in grid)

    metrics = _csv(run / "metrics.csv")
    curves = _csv(out / "curves.csv")
    assert [c["val_f1"] for c in curves] == [m["val_f1"] for m in metrics]
    val = _csv(run / "val_predictions.csv")
    conf = _csv(out / "confusion.csv")
    cm = np.array([[int(v) for k, v in row.items() if k != "true \\ predicted"] for row in conf])
    assert cm.sum() == len(val) and np.trace(cm) == sum(v["label"] == v["pred"] for v in val)
    for task, decode, n in (("mask", lambda a: a // 6, 3), ("gender", lambda a: (a // 3) % 2, 2), ("age", lambda a: a % 3, 3)):
        tcm = np.array([[int(v) for k, v in row.items() if k != "true \\ predicted"] for row in _csv(out / f"confusion_{task}.csv")])
        want = np.zeros((n, n), int)
        for v in val:
            want[decode(int(v["label"])), decode(int(v["pred"]))] += 1
        assert (tcm == want).all(), task
    scores = {f["image_id"]: f["score"] for f in _csv(out / "fallbacks.csv")}
    assert all(scores[r["image_id"]] == ("" if r["score"] is None else f"{r['score']}") for r in rows if r["status"] != "ok")
    f1 = _csv(out / "per_class_f1.csv")
    assert sum(int(r["photos"]) for r in f1) == len(val)
    seen = {int(v["label"]) for v in val} | {int(v["pred"]) for v in val}
    assert {int(r["label"]) for r in f1 if r["f1"] == "absent"} == set(range(18)) - seen  # absent, not 0.00
    assert all(r["f1"] != "absent" for r in f1 if int(r["label"]) in seen) and len(seen) < 18
    wrong = _csv(out / "most_confidently_wrong.csv")
    assert len(wrong) == min(16, sum(v["label"] != v["pred"] for v in val))
    confs = [float(w["confidence"]) for w in wrong]
    assert confs == sorted(confs, reverse=True)

    page = index.read_text(encoding="utf-8")
    best = max(metrics, key=lambda m: float(m["val_f1"]))
    assert f"Best epoch {best['epoch']} of {len(metrics)}" in page and f"{float(best['val_f1']):.4f}" in page
    assert "Resolved configuration" in page and "&quot;img_size&quot;" not in page and "<td>img_size</td>" in page
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) >= 10
    referenced = set(re.findall(r"src='([^']+\.png)'", page))
    assert referenced == set(pngs)
    for name in re.findall(r"href='([^']+\.csv)'", page):
        assert (out / name).is_file()
    assert "<img src='confusion_mask.png'" in page and "href='confusion_mask.csv'" in page


def test_report_takes_a_kfold_run_folder_as_predict_and_compare_do(tmp_path):
    """Issue 34, item 7: `report CROPS RUN` refused a k-fold run ("give one fold")."""
    import csv

    import numpy as np

    from classify.training.config import TrainConfig
    from classify.training.train import fit
    from classify.study.report import report
    from tests.conftest import make_crops

    crops = make_crops(tmp_path / "c", people=12, size=16)
    summary = fit(TrainConfig(crops=str(crops), out=str(tmp_path / "k"), model="resnet18", img_size=32, epochs=1,
                              folds=2, fold="all", workers=0, weights="none", device="cpu", preset="none"),
                  warn=lambda m: None)
    index = report(crops, tmp_path / "rep", run=tmp_path / "k")
    with open(tmp_path / "rep" / "confusion.csv", newline="") as f:
        cm = np.array([[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]])
    assert cm.sum() == summary["oof_photos"] == 12 * 7  # every person once, out of fold
    (curve,) = _csv(tmp_path / "rep" / "curves.csv")  # one epoch: the folds' mean
    folds = [float(_csv(tmp_path / "k" / f"fold{k}" / "metrics.csv")[0]["val_f1"]) for k in range(2)]
    assert float(curve["val_f1"]) == pytest.approx(np.mean(folds))
    assert index.is_file() and "calibration.png" in index.read_text()


def test_a_run_trained_on_other_crops_is_named_and_a_moved_copy_is_not(tmp_path):
    """`report CROPS_B RUN` of a run trained on CROPS_A drew CROPS_B's data beside the run's validation on CROPS_A,
    as if they were one folder's, with no word of it."""
    import shutil

    from classify.study.report import report_cautions
    from tests.conftest import make_crops

    a, b = make_crops(tmp_path / "a", people=8, size=16), make_crops(tmp_path / "b", people=9, size=16, seed=3)
    fit(TrainConfig(crops=str(a), out=str(tmp_path / "r"), model="resnet18", img_size=16, epochs=1, workers=0,
                    weights="none", device="cpu", preset="none"), warn=lambda m: None)
    index = report(b, tmp_path / "rep", run=tmp_path / "r")
    said = [c for c in report_cautions(b, tmp_path / "r") if "was trained on the crops in" in c]
    assert said == [f"{tmp_path / 'r'} was trained on the crops in {a}, not on {b}: its Model section (scores, "
                    f"confusion, curves, calibration) is its validation there, beside {b}'s data figures; report {a} "
                    f"with this run, or {b} with a run trained on it"]
    assert f"was trained on the crops in {a}, not on {b}" in index.read_text()
    shutil.copytree(a, tmp_path / "moved")  # the same crops, moved: the same key and raw folder
    assert not [c for c in report_cautions(tmp_path / "moved", tmp_path / "r") if "was trained on" in c]
    assert not [c for c in report_cautions(a, tmp_path / "r") if "was trained on" in c]
