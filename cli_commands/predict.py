"""The commands that apply a trained model: predict, pseudo-label, evaluate and explain."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import (BATCH, CALIBRATE, CROP_CACHE, DEVICE, TTA, VOTE, WORKERS, LazyProgress, console, models_line,
                     check_outputs, require_extra, user_errors, warning)


@user_errors
def predict(
    paths: list[Path] = typer.Argument(..., metavar="CKPT... RAW_OR_CROPS", help="Checkpoint(s) or run folders, then an eval folder "
                                                 "(info.csv + images/) or a crops folder."),
    out: Path = typer.Option(Path("submission.csv"), "--out", "-o", help="Submission CSV (ImageID,ans)."),
    probs: Optional[Path] = typer.Option(None, help="Also write the 18 probabilities per image here."),
    tta: int = TTA,
    crops: Optional[Path] = CROP_CACHE,
    device: str = DEVICE,
    batch_size: int = BATCH,
    workers: int = WORKERS,
    vote: str = VOTE,
    calibrate: bool = CALIBRATE,
    review: Optional[Path] = typer.Option(None, help="Also write the photos the model is unsure of (top calibrated "
                                                     "probability below --below), with their top 3 classes, here."),
    below: float = typer.Option(0.5, help="The --review threshold: a top probability below this is listed."),
):
    """Predict eval photos with checkpoints or run folders (a k-fold run: every fold); writes ImageID,ans."""
    check_outputs(files={"--out": out, "--probs": probs, "--review": review}, reads=paths)
    from classify.inference.predictor import predict as run_predict  # imports no torch: an .onnx runs without it
    from preprocess.runtime import steady_malloc

    steady_malloc()  # memory flat over a long predict (BENCHMARKS §21)

    ckpts, source = _models_then(paths, "the folder to predict")
    t0 = time.perf_counter()
    with LazyProgress("crop") as bar:
        pred = run_predict(ckpts, source, out, tta=tta, probs_out=probs, cache=crops, device=device,
                           batch_size=batch_size, workers=workers, on_progress=bar.update, vote=vote,
                           calibrate=calibrate, review=review, below=below)
    secs = time.perf_counter() - t0
    for w in pred.warnings:
        warning(w)
    counts = {}
    for y in pred.labels:
        counts[int(y)] = counts.get(int(y), 0) + 1
    console.print(models_line(pred.models), highlight=False)
    console.print(f"{len(pred.image_ids)} photos predicted with {len(pred.models)} model(s), tta={tta}, vote={vote}, "
                  f"in {secs:.1f}s ({len(pred.image_ids) / secs:.1f} photos/s, crop included)")
    console.print(f"submission: {escape(str(out))}", highlight=False)
    if review is not None:
        unsure = int((pred.confidence < below).sum())
        console.print(f"review: {escape(str(review))} ({unsure} photos with a top probability below {below})",
                      highlight=False)


def _models_then(paths: list[Path], what: str) -> tuple[list[Path], Path]:
    """The checkpoints (run folders, or one .onnx) given first, and the folder they apply to, given last."""
    from classify.errors import ConfigError

    if len(paths) < 2:
        raise ConfigError(f"give at least one checkpoint and then {what}")
    return paths[:-1], paths[-1]


@user_errors
def pseudo_label(
    paths: list[Path] = typer.Argument(..., metavar="CKPT... RAW_OR_CROPS", help="Checkpoint(s) or run folders, then an "
                                                 "eval folder (info.csv + images/) or a crops folder."),
    out: Path = typer.Option(..., "--out", "-o", help="The crops folder to write (for train --extra)."),
    min_prob: float = typer.Option(0.9, help="Keep photos whose top class probability is at least this."),
    tta: int = TTA,
    crops: Optional[Path] = CROP_CACHE,
    device: str = DEVICE,
    batch_size: int = BATCH,
    workers: int = WORKERS,
    vote: str = VOTE,
    calibrate: bool = CALIBRATE,
):
    """Write the eval photos the model is confident about, with their predicted labels, as a crops folder."""
    check_outputs(folders={"--out": out})
    from classify.inference.pseudo import pseudo_label as run
    from preprocess.runtime import steady_malloc

    steady_malloc()  # as predict: memory flat over many batches

    ckpts, source = _models_then(paths, "the folder to pseudo-label")
    with LazyProgress("crop") as bar:
        res = run(ckpts, source, out, min_prob, tta, crops, device, batch_size, workers, vote, on_progress=bar.update,
                  calibrate=calibrate)
    for w in res.warnings:
        warning(w)
    names = res.classes
    table = Table(title=f"{res.kept} of {res.total} photos at p >= {min_prob}")
    table.add_column("class")
    table.add_column("photos", justify="right")
    for y, n in res.by_class.items():
        table.add_row(names[y], str(n))
    console.print(table)
    console.print(f"pseudo-labelled crops: {escape(str(res.out))} (train with --extra {escape(str(res.out))})", highlight=False)


@user_errors
def evaluate(
    paths: list[Path] = typer.Argument(..., metavar="CKPT... CROPS", help="Checkpoint(s) or run folders, then a labelled crops folder."),
    tta: int = TTA,
    confusion: Optional[Path] = typer.Option(None, help="Write the confusion matrix PNG here."),
    device: str = DEVICE,
    batch_size: int = BATCH,
    workers: int = WORKERS,
    vote: str = VOTE,
    calibrate: bool = CALIBRATE,
):
    """Accuracy and macro F1 (18 classes and per task) of checkpoint(s) or run folders on a labelled crops folder."""
    check_outputs(files={"--confusion": confusion}, reads=paths)
    from classify.inference.evaluate import evaluate as run_evaluate
    from preprocess.runtime import steady_malloc

    steady_malloc()  # as predict: memory flat over many batches

    ckpts, crops_dir = _models_then(paths, "the crops folder")
    res = run_evaluate(ckpts, crops_dir, tta=tta, device=device, batch_size=batch_size, workers=workers,
                       confusion_png=confusion, vote=vote, calibrate=calibrate)
    for w in res["warnings"]:
        warning(w)
    sc = res["scores"]
    console.print(models_line(res["models"]), highlight=False)
    t = Table(title=f"{res['n']} labelled photos of {escape(str(crops_dir))}")
    for c in ("", "accuracy", "macro F1"):
        t.add_column(c, justify="right" if c else "left")
    t.add_row("18 classes", f"{sc['acc']:.4f}", f"{sc['f1']:.4f}")
    for task in ("mask", "gender", "age"):
        t.add_row(task, f"{sc[task + '_acc']:.4f}", f"{sc[task + '_f1']:.4f}")
    console.print(t)
    pc = Table(title="per-class F1")
    pc.add_column("class")
    pc.add_column("F1", justify="right")
    pc.add_column("photos", justify="right")
    support = [sum(row) for row in res["confusion"]]
    predicted = [sum(col) for col in zip(*res["confusion"])]
    for name, f1, n, p in zip(res["class_names"], res["per_class_f1"], support, predicted):
        pc.add_row(name, "absent" if n == 0 and p == 0 else f"{f1:.3f}", str(n))
    console.print(pc)
    temps = ", ".join(f"{t:.3g}" for t in res["temperatures"])
    console.print(f"calibration: expected calibration error {res['ece_before']:.4f} before, {res['ece_after']:.4f} after "
                  f"temperature scaling (T = {temps}; 15 bins, top class)", highlight=False)
    if confusion:
        console.print(f"confusion matrix: {escape(str(confusion))}", highlight=False)


@user_errors
def explain(
    paths: list[Path] = typer.Argument(..., metavar="CKPT PHOTO...", help="A checkpoint or run folder, then photos."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for gradcam.png and gradcam.csv."),
    crops: Optional[Path] = CROP_CACHE,
    device: str = DEVICE,
):
    """Grad-CAM per task for any photos, cropped as predict crops them: where the model looks."""
    check_outputs(folders={"--out": out})
    require_extra("explain", "maskcls explain")
    from classify.errors import ConfigError
    from classify.study.explain import explain_photos

    if len(paths) < 2:
        raise ConfigError("give a checkpoint (or run folder) and then one or more photos")
    png, table, warnings = explain_photos(paths[0], paths[1:], out, crops, device)
    for w in warnings:
        warning(w)
    console.print(f"explain: {escape(str(png))}, {escape(str(table))}", highlight=False)
