"""maskcls command line: crop → train → predict (and evaluate, report).

Each command turns its options into the library's config and calls one entry function; the
project's own errors become a one-line message and exit code 1.
"""
from __future__ import annotations

import errno
import functools
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

if __package__ in (None, "") and str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python cli.py` from a checkout

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Face crops, training and prediction for mask status x gender x age group.")
console = Console(stderr=True)

# The options predict, evaluate and pseudo-label share, declared once.
TTA = typer.Option(1, help="Views averaged: 1 none, 2 + mirror, 3 + zoom, 4 + zoomed mirror. "
                           "--tta alone is not valid: give a number.")
CROP_CACHE = typer.Option(None, help="Where raw photos are cropped (default: ~/.cache/maskcls/crops/<photos + crop settings>).")
DEVICE = typer.Option("auto", help="auto | cpu | cuda.")
BATCH = typer.Option(64, help="Images per forward pass.")
WORKERS = typer.Option(2, help="DataLoader worker processes.")
VOTE = typer.Option("soft", help="Several models: soft (mean probability) | hard (majority of top classes).")
CALIBRATE = typer.Option(True, "--calibrate/--no-calibrate", metavar="",
                         help="Apply each checkpoint's fitted temperature to its probabilities.")


@app.callback()
def main():
    """maskcls: raw photos → face crops → trained classifier → submission."""


WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}
ACCESS_ERRNOS = {errno.EACCES, errno.EPERM}


def user_errors(fn):
    """Turn the project's own errors (a user's mistake, not a bug) and the file system's refusals
    (no space, read-only, no permission, no such file) into one line and exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from classify.errors import USER_ERRORS
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            console.print(f"interrupted: `maskcls {fn.__name__.replace('_runs', '').replace('_', '-')}` stopped. What it had written is whole "
                          "(files are written under temporary names and renamed); rerun the same command to continue "
                          "(crop resumes from its journal; train: add --resume)", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except USER_ERRORS as e:
            if isinstance(e, OSError) and e.filename:  # name the file the user knows, not a temporary one
                e = f"{_user_path(e.filename)}: {e.strerror or e}"
            line = f"{e}"
        except OSError as e:
            where = f" {_user_path(e.filename)}" if e.filename else ""
            if e.errno in WRITE_ERRNOS:
                line = (f"cannot write{where}: {e.strerror or e}. Files written before (manifest, checkpoints) are "
                        "left as they were.")
            elif e.errno in ACCESS_ERRNOS:
                line = (f"cannot write or read{where}: {e.strerror or e} (check the folder's permissions). Files "
                        "written before (manifest, checkpoints) are left as they were.")
            else:
                raise
        console.print(f"[bold red]error:[/] {escape(str(line))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    return wrapper


def _user_path(filename) -> str:
    """The file a user asked for, not the temporary name it is written under ('.manifest.csv.x1y2.tmp')."""
    p = Path(str(filename))
    m = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", p.name)
    return str(p.parent / m[1]) if m else str(p)


def warning(message: str) -> None:
    """One warning line; the message (paths, library text) is printed as it is, never read as markup."""
    console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


class LazyProgress:
    """A rich progress bar that appears on the first update, so a command that fails before any
    work prints only its error. `update(done, total)` shows photos/s and the ETA."""

    def __init__(self, what: str, unit: str = "photos"):
        self.what, self.unit, self.bar, self.task, self.t0 = what, unit, None, None, time.perf_counter()

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = Progress(TextColumn(f"[bold]{self.what}"), BarColumn(), MofNCompleteColumn(),
                                TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                console=console)
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=total, rate="")
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, completed=done, total=total, rate=f"{rate:.1f} {self.unit}/s")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def load_prior(path: Path):
    """The face prior of a training crops folder (its crops.json) or of a checkpoint / run folder."""
    from preprocess.layouts import LayoutError
    from preprocess.manifest import META, read_meta
    from preprocess.subject import Prior

    if path.is_dir() and (path / META).is_file():
        meta, what = read_meta(path), f"{path}/{META}"
    elif path.is_dir() and not (path / "best.pt").is_file():
        raise LayoutError(f"--prior {path}: neither a crops folder (no {META}) nor a run folder (no best.pt)")
    else:
        from classify.checkpoint import load_checkpoint  # imports torch: only for a checkpoint
        ckpt = path / "best.pt" if path.is_dir() else path
        meta, what = load_checkpoint(ckpt).get("crop") or {}, str(ckpt)
    if "prior" not in meta:
        raise LayoutError(f"--prior {path}: {what} records no face prior (made before maskcls learned one): "
                          "crop the training photos again, or leave --prior out for the built-in one")
    try:
        return Prior.from_dict(meta["prior"])
    except (KeyError, TypeError, ValueError) as e:
        raise LayoutError(f"--prior {path}: {what} holds a damaged face prior ({e}); crop the training photos again") from None


@app.command()
@user_errors
def crop(
    raw: Path = typer.Argument(..., metavar="RAW", help="Raw data set: competition train/eval folder, or a folder with labels.csv."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for crops/, manifest.csv, crops.npy."),
    size: int = typer.Option(256, help="Side of the square crop, pixels."),
    margin: float = typer.Option(0.3, help="Fraction of the face box side added on each side."),
    device: str = typer.Option("auto", help="auto | cpu | cuda (auto: cuda when available)."),
    batch_size: int = typer.Option(32, help="Photos per detector call; equal-size photos are batched."),
    detect_side: int = typer.Option(256, help="Detect on a copy with this longer side (0: full size)."),
    min_face: float = typer.Option(0.3, help="Smallest face searched, fraction of the photo's shorter side."),
    workers: int = typer.Option(2, help="Threads that decode photos and write crops."),
    old: int = typer.Option(60, help="Age-group threshold for the manifest's age_group/label (>= old is group 2)."),
    pack: bool = typer.Option(True, metavar="", help="Also write crops.npy, the uint8 array training memory-maps."),
    strict: bool = typer.Option(False, "--strict", metavar="", help="Stop before any work if a photo is missing or badly named."),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="", help="Replace the crops in --out even if they were made from another RAW."),
    prior: Optional[Path] = typer.Option(None, help="Training crops folder or checkpoint whose face prior chooses "
                                                    "the face of lone photos (eval): crop eval photos as training's."),
):
    """Find the face in every photo and write square crops plus CROPS/manifest.csv."""
    from preprocess import CropConfig, crop_dataset
    from preprocess.manifest import PROBLEMS
    from preprocess.runtime import dist_env

    cfg = CropConfig(size=size, margin=margin, device=device, batch_size=batch_size, detect_side=detect_side,
                     min_face=min_face, workers=workers, old=old, pack=pack, strict=strict)
    rank, world, _ = dist_env()
    dist = None
    if world > 1:  # under torchrun: each rank crops its share of the people on its own device
        import dataclasses

        from classify.distributed import init_distributed
        dist = init_distributed(cfg.device)
        cfg = dataclasses.replace(cfg, device=str(dist.device))
    t0 = time.perf_counter()
    try:
        with LazyProgress("crop") as bar:
            res = crop_dataset(raw, out, cfg, on_progress=bar.update if rank == 0 else None, rank=rank,
                               world=world, barrier=dist.barrier if dist else None,
                               broadcast=dist.broadcast if dist else None, prior=load_prior(prior) if prior else None,
                               overwrite=overwrite)
    except BaseException:
        if dist:
            dist.abort()
            dist = None
        raise
    finally:
        if dist:
            dist.close()
    if rank != 0:
        return
    secs = time.perf_counter() - t0
    console.print(f"{len(res.rows)} photos, {res.layout} layout, {secs:.1f}s", highlight=False)
    table = Table()
    table.add_column("status")
    table.add_column("photos", justify="right")
    for status, n in res.counts.items():
        if n:
            table.add_row(status, str(n))
    table.add_row("[dim]detected this run[/]", str(res.detected))
    table.add_row("[dim]reused from cache[/]", str(len(res.rows) - res.detected))
    console.print(table)
    for w in res.warnings:
        warning(w)
    problems = [r for r in res.rows if r["status"] in PROBLEMS]
    for r in problems[:20]:
        console.print(f"[yellow]{r['status']}:[/] {escape(r['source'])}: {escape(r['reason'])}", highlight=False)
    if len(problems) > 20:
        console.print(f"[yellow]… and {len(problems) - 20} more:[/] see the status and reason columns of the manifest")
    console.print(f"manifest: {escape(str(res.crops / 'manifest.csv'))}", highlight=False)


@app.command()
@user_errors
def train(
    ctx: typer.Context,
    crops: Optional[Path] = typer.Argument(None, metavar="CROPS", help="Crops folder written by `maskcls crop`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (config, split, metrics, checkpoints)."),
    config: Optional[Path] = typer.Option(None, help="TOML file with any of these options (the command line wins)."),
    model: Optional[str] = typer.Option(None, help="Any torchvision classification model (resnet18, mobilenet_v2, "
                                                   "efficientnet_b4, convnext_tiny, ...), timm/<name>, or attention (default: resnet18)."),
    backbone: Optional[str] = typer.Option(None, help="Backbone of the attention model (same names) (default: resnet18)."),
    dropout: Optional[float] = typer.Option(None, help="Dropout before the head(s) (default: 0.2)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: 10)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size per process (default: 32)."),
    accum: Optional[int] = typer.Option(None, help="Gradient accumulation: batches per optimizer step (default: 1)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate of the head(s) (default: 1e-3)."),
    backbone_lr: Optional[float] = typer.Option(None, help="A pretrained backbone's learning rate, as a fraction "
                                                           "of --lr (default: 0.1)."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay (default: 1e-4)."),
    optimizer: Optional[str] = typer.Option(None, help="adam | adamw | sgd (default: adamw)."),
    scheduler: Optional[str] = typer.Option(None, help="none | cosine | onecycle (default: cosine)."),
    warmup: Optional[float] = typer.Option(None, help="Epochs of linear warmup before the cosine (default: 1)."),
    clip_grad: Optional[float] = typer.Option(None, help="Clip the gradients' norm to this (0: off) (default: 0)."),
    ema: Optional[float] = typer.Option(None, help="Decay of an EMA of the weights, validated each epoch and kept "
                                                   "when better (0: off) (default: 0)."),
    patience: Optional[int] = typer.Option(None, help="Stop after this many epochs without a better val F1 (0: off) (default: 0)."),
    img_size: Optional[int] = typer.Option(None, help="Model input side, pixels (default: 224)."),
    preset: Optional[str] = typer.Option(None, help="Augmentation: base | strong | none (default: base)."),
    mix: Optional[str] = typer.Option(None, help="Batch mixing: none | cutmix | mixup | vcutmix (left/right halves of "
                                                 "two photos of the same mask status) | vcutmix-class (same class) (default: none)."),
    mix_alpha: Optional[float] = typer.Option(None, help="Beta(alpha, alpha) of the mixing ratio (default: 1.0)."),
    synth_mask: Optional[float] = typer.Option(None, help="Chance that an unmasked training crop gets a mask drawn "
                                                          "from its landmarks (label: wear or incorrect) (default: 0)."),
    extra: Optional[List[Path]] = typer.Option(None, metavar="CROPS", help="Crops folder added to training only, never validation "
                                                          "(e.g. `maskcls pseudo-label`'s); repeatable."),
    loss: Optional[str] = typer.Option(None, help="wce (class-weighted CE) | ce | smooth | focal | f1 (default: wce)."),
    smoothing: Optional[float] = typer.Option(None, help="Label smoothing of --loss smooth (default: 0.1)."),
    gamma: Optional[float] = typer.Option(None, help="Focusing parameter of --loss focal (default: 2.0)."),
    task_weighting: Optional[str] = typer.Option(None, help="Attention model: fixed | uncertainty (default: uncertainty)."),
    val_ratio: Optional[float] = typer.Option(None, help="Share of people held out for validation (default: 0.2)."),
    folds: Optional[int] = typer.Option(None, help="K-fold by person: K (0: use --val-ratio) (default: 0)."),
    fold: Optional[str] = typer.Option(None, help="Which fold validates, 0..K-1, or all: every fold into RUN/fold<k> (default: 0)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the split, order, augmentation (default: 42)."),
    old: Optional[int] = typer.Option(None, help="Training labels' age boundary: age >= old is group 2 (default: 60)."),
    val_old: Optional[int] = typer.Option(None, help="The boundary validation and model selection score at (default: 60)."),
    drop_ages_near: Optional[int] = typer.Option(None, help="Leave out training people this many years or less "
                                                            "from an age boundary (0: none) (default: 0)."),
    freeze_backbone: Optional[bool] = typer.Option(None, "--freeze-backbone/--no-freeze-backbone", metavar="",
                                                   help="Train only the head (default: off)."),
    weights: Optional[str] = typer.Option(None, help="auto | imagenet | none | PATH (default: auto: imagenet when cached or "
                                                     "downloadable, else random init with a warning)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda (default: auto)."),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers per process (default: the cores less one, <= 8)."),
    amp: Optional[str] = typer.Option(None, help="auto | bf16 | fp16 | off: mixed precision on CUDA (default: auto)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", metavar="", help="torch.compile the model (default: off)."),
    sampler: Optional[str] = typer.Option(None, help="none | weighted (inverse class frequency) (default: none)."),
    label_fixes: Optional[Path] = typer.Option(None, help="CSV image_id,field,value of label corrections."),
    calibrate: Optional[bool] = typer.Option(None, "--calibrate/--no-calibrate", metavar="",
                                             help="Fit a temperature on the validation predictions after training, "
                                                  "stored in best.pt (default: on)."),
    resume: bool = typer.Option(False, "--resume", metavar="", help="Continue the run in --out (a k-fold run: fold by fold)."),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="", help="Replace the run already in --out."),
):
    """Train a classifier on the crops (person-level split); writes RUN/best.pt and friends."""
    from classify.errors import ConfigError
    from classify.config import load_config, resume_config
    from classify.train import fit
    from preprocess.runtime import dist_env

    opts = {k: v for k, v in ctx.params.items() if k not in ("config", "resume", "overwrite")}
    if resume:
        if out is None:
            raise ConfigError("--resume needs --out RUN, the run to continue")
        given = {k: v for k, v in opts.items() if k not in ("crops", "out")}
        cfg = resume_config(out, given)
        if crops is not None and Path(cfg.crops).resolve() != crops.resolve():
            raise ConfigError(f"--resume: {out} was trained on {cfg.crops}, not {crops}")
    else:
        cfg = load_config(opts, config)
    rank = dist_env()[0]
    t0 = time.perf_counter()

    def show(rec):
        if rank:
            return
        fold_tag = f"fold {rec['fold'] + 1}/{rec['folds']}, " if "fold" in rec else ""
        t = Table(title=f"{fold_tag}epoch {rec['epoch']}/{cfg.epochs}" + ("  [green]best[/]" if rec["best"] else ""),
                  title_justify="left")
        for c in ("loss", "val loss", "acc", "F1", "mask F1", "gend F1", "age F1", "lr", "sec"):
            t.add_column(c, justify="right")
        t.add_row(f"{rec['train_loss']:.4f}", f"{rec['val_loss']:.4f}", f"{rec['val_acc']:.3f}", f"{rec['val_f1']:.3f}",
                  f"{rec['val_mask_f1']:.3f}", f"{rec['val_gender_f1']:.3f}", f"{rec['val_age_f1']:.3f}",
                  f"{rec['lr']:.0e}", f"{rec['seconds']:.0f}")
        console.print(t)

    bar = {"p": None}

    def step(done, total):
        if rank:
            return
        if bar["p"] is None or done == 1:
            if bar["p"] is not None:
                bar["p"].__exit__()
            bar["p"] = LazyProgress("train", unit="batches")
        bar["p"].update(done, total)
        if done == total:
            bar["p"].__exit__()
            bar["p"] = None

    try:
        summary = fit(cfg, resume=resume, overwrite=overwrite, on_epoch=show, on_step=step,
                      warn=warning)
    finally:
        if bar["p"] is not None:
            bar["p"].__exit__()
    if rank == 0:
        _train_summary(cfg, summary, time.perf_counter() - t0)


def _calibration_line(c: dict | None) -> None:
    if c:
        console.print(f"calibration: temperature {c['temperature']:.3g} fitted on {c['photos']} validation photos; "
                      f"expected calibration error {c['ece_before']:.4f} before, {c['ece_after']:.4f} after", highlight=False)


def _train_summary(cfg, summary: dict, secs: float) -> None:
    if "oof" in summary:
        o = summary["oof"]
        t = Table(title=f"{cfg.folds} folds, out-of-fold ({summary['oof_photos']} photos, at age boundary "
                        f"{summary['val_old']})", title_justify="left")
        for c in ("", "F1", "acc", "mask F1", "gender F1", "age F1"):
            t.add_column(c, justify="right" if c else "left")
        t.add_row("out-of-fold, best epochs*", *(f"{o[k]:.4f}" for k in ("f1", "acc", "mask_f1", "gender_f1", "age_f1")))
        if summary.get("oof_last"):
            t.add_row("out-of-fold, last epochs", *(f"{summary['oof_last'][k]:.4f}"
                                                    for k in ("f1", "acc", "mask_f1", "gender_f1", "age_f1")))
        mean, std = summary["fold_mean"], summary["fold_std"]
        t.add_row("fold mean ± std", *(f"{mean['val_' + k]:.3f} ± {std['val_' + k]:.3f}"
                                       for k in ("f1", "acc", "mask_f1", "gender_f1", "age_f1")))
        console.print(t)
        console.print("* each fold's best epoch was chosen on that fold's own validation people, so this score is "
                      "optimistic; the last epochs' score selects nothing", highlight=False)
        console.print(f"run: {escape(cfg.out)}  (fold0..{cfg.folds - 1}/, oof_predictions.csv, summary.json) in {secs:.0f}s; "
                      f"predict with `maskcls predict {cfg.out} EVAL`")
    else:
        b = summary["best"]
        console.print(f"best epoch {b['epoch']}: macro F1 {b['val_f1']:.4f}, accuracy {b['val_acc']:.4f} "
                      f"({summary['val_photos']} validation photos of {summary['val_people']} people, age boundary "
                      f"{summary['val_old']}) in {secs:.0f}s")
        left = summary["excluded_photos"] + summary["dropped_near_boundary"]
        extra = f" (of them {summary['extra_photos']} from --extra, training only)" if summary.get("extra_photos") else ""
        console.print(f"trained on {summary['train_photos']} photos of {summary['train_people']} people{extra}; left out "
                      f"{left} ({summary['excluded_photos']} without a label or a usable crop, "
                      f"{summary['dropped_near_boundary']} by --drop-ages-near)", highlight=False)
        console.print(f"run: {escape(cfg.out)}  (best.pt, last.pt, metrics.csv, val_predictions.csv, confusion.png)", highlight=False)
    _calibration_line(summary.get("calibration"))
    if summary.get("warnings"):  # said in full when they arose; the summary points back at them
        console.print(f"[yellow]{len(summary['warnings'])} warning(s)[/] above (also in summary.json): "
                      + escape("; ".join(w.split(":")[0] for w in summary["warnings"])), highlight=False, soft_wrap=True)


@app.command()
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
    from classify.errors import ConfigError
    from classify.onnx_model import is_onnx

    if len(paths) < 2:
        raise ConfigError("give at least one checkpoint and then the folder to predict")
    for name, path in (("--out", out), ("--probs", probs)):
        if path is not None and path.is_dir():
            raise ConfigError(f"{name} {path} is a folder: give a file name (e.g. {path / 'submission.csv'})")
    *ckpts, source = paths
    t0 = time.perf_counter()
    with LazyProgress("crop") as bar:
        if any(is_onnx(c) for c in ckpts):  # an exported model: onnxruntime, and torch is never imported
            if len(ckpts) > 1:
                raise ConfigError("give one exported .onnx model (export several checkpoints into one graph)")
            from classify.deploy import predict_onnx
            pred = predict_onnx(ckpts[0], source, out, tta=tta, probs_out=probs, cache=crops, device=device,
                                batch_size=batch_size, on_progress=bar.update, review=review, below=below)
        else:
            from classify.predict import predict as run_predict
            pred = run_predict(ckpts, source, out, tta=tta, probs_out=probs, cache=crops, device=device,
                               batch_size=batch_size, workers=workers, on_progress=bar.update, vote=vote,
                               calibrate=calibrate, review=review, below=below)
    secs = time.perf_counter() - t0
    for w in pred.warnings:
        warning(w)
    counts = {}
    for y in pred.labels:
        counts[int(y)] = counts.get(int(y), 0) + 1
    console.print(_models_line(pred.models), highlight=False)
    console.print(f"{len(pred.image_ids)} photos predicted with {len(pred.models)} model(s), tta={tta}, vote={vote}, "
                  f"in {secs:.1f}s ({len(pred.image_ids) / secs:.1f} photos/s, crop included)")
    console.print(f"submission: {escape(str(out))}", highlight=False)
    if review is not None:
        unsure = int((pred.probs.max(1) < below).sum())
        console.print(f"review: {escape(str(review))} ({unsure} photos with a top probability below {below})",
                      highlight=False)


def _models_line(models: list[str]) -> str:
    return f"{len(models)} model(s): " + escape(", ".join(models))


@app.command("pseudo-label")
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
    from classify.errors import ConfigError
    from classify.pseudo import pseudo_label as run
    from preprocess.labels import class_names

    if len(paths) < 2:
        raise ConfigError("give at least one checkpoint and then the folder to pseudo-label")
    *ckpts, source = paths
    with LazyProgress("crop") as bar:
        res = run(ckpts, source, out, min_prob, tta, crops, device, batch_size, workers, vote, on_progress=bar.update,
                  calibrate=calibrate)
    for w in res.warnings:
        warning(w)
    names = class_names()
    table = Table(title=f"{res.kept} of {res.total} photos at p >= {min_prob}")
    table.add_column("class")
    table.add_column("photos", justify="right")
    for y, n in res.by_class.items():
        table.add_row(names[y], str(n))
    console.print(table)
    console.print(f"pseudo-labelled crops: {escape(str(res.out))} (train with --extra {escape(str(res.out))})", highlight=False)


@app.command()
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
    from classify.errors import ConfigError
    from classify.evaluate import evaluate as run_evaluate

    if len(paths) < 2:
        raise ConfigError("give at least one checkpoint and then the crops folder")
    *ckpts, crops_dir = paths
    res = run_evaluate(ckpts, crops_dir, tta=tta, device=device, batch_size=batch_size, workers=workers,
                       confusion_png=confusion, vote=vote, calibrate=calibrate)
    sc = res["scores"]
    console.print(_models_line(res["models"]), highlight=False)
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


@app.command()
@user_errors
def report(
    crops: Path = typer.Argument(..., metavar="CROPS", help="Crops folder written by `maskcls crop`."),
    run: Optional[Path] = typer.Argument(None, metavar="RUN", help="Optional run folder written by `maskcls train`."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the PNG figures, their CSVs and index.html."),
    seed: int = typer.Option(0, help="Seed of the random crops shown per class."),
    per_class: int = typer.Option(6, help="Crops shown per class in the grid."),
):
    """Figures of the data (and of a run) with their numbers as CSV, and one index.html."""
    from classify.report import report as run_report

    index = run_report(crops, out, run=run, seed=seed, per_class=per_class)
    console.print(f"report: {escape(str(index))}", highlight=False)


@app.command()
@user_errors
def export(
    paths: list[Path] = typer.Argument(..., metavar="CKPT...", help="Checkpoint(s) or run folders (a k-fold run: "
                                                                     "every fold, averaged in the graph)."),
    out: Path = typer.Option(..., "--out", "-o", help="The ONNX file to write."),
    int8: bool = typer.Option(False, "--int8", metavar="", help="Quantise to int8 (static, calibrated on the run's "
                                                                "validation crops); prints the accuracy change."),
    crops: Optional[Path] = typer.Option(None, help="Crops folder for the parity check and --int8 (default: the "
                                                    "run's own, from its config)."),
):
    """Export the classifier as one ONNX graph (uint8 crop in, probabilities out) for predict and serve without torch."""
    from classify.errors import ConfigError
    from classify.export import export as run_export

    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: give a file name (e.g. {out / 'model.onnx'})")
    res = run_export(paths, out, int8=int8, check_crops=crops)
    console.print(f"exported {res.models} model(s) to {escape(str(res.path))} ({res.path.stat().st_size / 1e6:.1f} MB); "
                  f"onnxruntime vs torch on {res.checked} crops: max probability difference {res.parity:.2e}",
                  highlight=False)
    if res.int8:
        q = res.int8
        console.print(f"int8 on {q['photos']} validation photos: macro F1 {q['fp32_f1']:.4f} → {q['int8_f1']:.4f}, "
                      f"accuracy {q['fp32_acc']:.4f} → {q['int8_acc']:.4f}, same top class for {q['agree']:.1%}",
                      highlight=False)


@app.command()
@user_errors
def serve(
    model: Path = typer.Argument(..., metavar="MODEL", help="model.onnx (maskcls export), or a checkpoint or run "
                                                            "folder (exported first, into a temporary file)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind: 127.0.0.1 serves this machine only; 0.0.0.0 "
                                               "serves the network (see README)."),
    port: int = typer.Option(8000, help="Port."),
    max_bytes: int = typer.Option(10_000_000, help="Largest request body, bytes."),
    max_files: int = typer.Option(16, help="Most photos in one request."),
    wait_ms: float = typer.Option(5.0, help="How long the server gathers concurrent requests into one batch, ms."),
):
    """Serve the model over HTTP: POST /predict (multipart field `file`), GET /health, and a page at /."""
    import tempfile

    from classify.errors import ConfigError
    from classify.onnx_model import is_onnx

    for name, value, lo in (("--port", port, 1), ("--max-bytes", max_bytes, 1), ("--max-files", max_files, 1)):
        if value < lo or (name == "--port" and value > 65535):
            raise ConfigError(f"{name} {value}: must be {'in 1..65535' if name == '--port' else '>= 1'}")
    try:
        from classify.serve import serve as run_serve
    except ImportError:
        raise ConfigError("maskcls serve needs fastapi and uvicorn: pip install 'maskcls[serve]'") from None
    with tempfile.TemporaryDirectory(prefix="maskcls-serve-") as tmp:
        if not is_onnx(model):
            from classify.export import export as run_export

            console.print(f"exporting {escape(str(model))} to ONNX first…", highlight=False)
            model = run_export([model], Path(tmp) / "model.onnx").path
        run_serve(model, host, port, max_bytes, max_files, wait_ms,
                  on_ready=lambda: console.print(f"serving {escape(str(model))} on http://{host}:{port}/ "
                                                 "(Ctrl-C stops)", highlight=False))


@app.command()
@user_errors
def explain(
    paths: list[Path] = typer.Argument(..., metavar="CKPT PHOTO...", help="A checkpoint or run folder, then photos."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for gradcam.png and gradcam.csv."),
    crops: Optional[Path] = CROP_CACHE,
    device: str = DEVICE,
):
    """Grad-CAM per task for any photos, cropped as predict crops them: where the model looks."""
    import shutil
    import tempfile

    from classify.checkpoint import load_checkpoint
    from classify.errors import ConfigError
    from classify.explain import explain_crops
    from classify.cropping import crops_for
    from classify.predict import checkpoint_paths
    from classify.rundir import ModelSpec
    from preprocess.manifest import read_manifest

    if len(paths) < 2:
        raise ConfigError("give a checkpoint (or run folder) and then one or more photos")
    ckpt_path, *photos = paths
    ckpt = load_checkpoint(checkpoint_paths([ckpt_path])[0])
    for p in photos:
        if not p.is_file():
            raise ConfigError(f"{p}: no such photo")
    with tempfile.TemporaryDirectory(prefix="maskcls-explain-") as tmp:  # the photos as an eval folder
        raw = Path(tmp) / "raw"
        (raw / "images").mkdir(parents=True)
        names = [f"{k:04d}_{p.name}" for k, p in enumerate(photos)]
        for p, n in zip(photos, names):
            shutil.copyfile(p, raw / "images" / n)
        (raw / "info.csv").write_text("ImageID,ans\n" + "".join(f"{n},0\n" for n in names))
        folder, warnings = crops_for(raw, ModelSpec.of(ckpt).crop, crops or Path(tmp) / "crops", device)
        rows = read_manifest(folder)
        for r, p in zip(rows, photos):
            r["image_id"] = p.name
        png, table = explain_crops(ckpt, folder, rows, out, f"Grad-CAM per task ({len(rows)} photos)", truth=False)
    for w in warnings:
        warning(w)
    console.print(f"explain: {escape(str(png))}, {escape(str(table))}", highlight=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def tune(
    ctx: typer.Context,
    crops: Path = typer.Argument(..., metavar="CROPS", help="Crops folder written by `maskcls crop`."),
    out: Path = typer.Option(..., "--out", "-o", help="Study folder: trial-<k>/ run folders, study.db, results."),
    trials: int = typer.Option(20, help="Finished trials wanted in the study, all processes together."),
    storage: Optional[str] = typer.Option(None, help="An RDB URL Optuna accepts (postgresql://...) to share the "
                                                     "study between machines (default: sqlite STUDY/study.db)."),
    space: Optional[Path] = typer.Option(None, help="TOML search space replacing the default (README)."),
    timeout: Optional[float] = typer.Option(None, help="Stop starting trials after this many seconds."),
    sampler_seed: int = typer.Option(0, help="Seed of the TPE sampler."),
    prune_startup: int = typer.Option(5, help="Trials finished before MedianPruner prunes."),
    prune_warmup: int = typer.Option(1, help="Epochs a trial trains before it can be pruned."),
    config: Optional[Path] = typer.Option(None, help="TOML file of fixed train options."),
):
    """Search the training recipe with Optuna; any `train` option given here is fixed for every trial."""
    import dataclasses

    from classify.config import load_config
    from classify.errors import ConfigError
    from classify.tune import tune as run_tune

    train_cmd = typer.main.get_command(app).get_command(ctx, "train")
    try:
        given = train_cmd.make_context("train", list(ctx.args), resilient_parsing=False).params
    except click.UsageError as e:
        raise ConfigError(f"{e.format_message()} (tune takes every `maskcls train` option as a fixed value)") from None
    given = {k: v for k, v in given.items() if k not in ("crops", "out", "config", "resume", "overwrite")}
    cfg = load_config(given | {"crops": crops, "out": out / "trial-0"}, config)
    explicit = {k for k, v in given.items() if v is not None and not (k == "extra" and not v)}
    if config:  # load_config has read it already: it is valid TOML
        import tomllib
        values = tomllib.loads(config.read_text())
        explicit |= set(values.get("train", values))
    fixed = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}

    def show(rec):
        value = f"F1 {rec['value']:.4f}" if rec["value"] is not None else rec["state"].lower()
        console.print(f"trial {rec['number']}: {value}  " + escape(", ".join(f"{k} {v}" for k, v in rec["params"].items())),
                      highlight=False)

    res = run_tune(fixed, out, trials, storage, space, timeout, sampler_seed, prune_startup, prune_warmup,
                   on_trial=show, warn=warning, fixed_names=explicit)
    _tune_table(res)


def _tune_table(res) -> None:
    optuna_trials = [t for t in res.study.get_trials(deepcopy=False) if t.value is not None]
    best = sorted(optuna_trials, key=lambda t: -t.value)[:10]
    t = Table(title=f"{res.finished} finished trials ({res.mine} by this process); best first", title_justify="left")
    for c in ("trial", "F1", "parameters"):
        t.add_column(c, overflow="fold")
    for tr in best:
        t.add_row(str(tr.number), f"{tr.value:.4f}", escape(", ".join(f"{k} {v}" for k, v in tr.params.items())))
    console.print(t)
    if res.best:
        console.print(f"best: trial {res.best['number']} (F1 {res.best['value']:.4f}); train it with "
                      f"`maskcls train --config {escape(str(res.out / 'best.toml'))} --out RUN`", highlight=False)
    console.print(f"study: {escape(str(res.out / 'index.html'))}", highlight=False)


@app.command(name="compare")
@user_errors
def compare_runs(
    runs: list[Path] = typer.Argument(..., metavar="RUN...", help="Two or more run folders (a k-fold run folder: mean ± std over folds)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for compare.csv, the figures and index.html."),
):
    """Runs side by side: the configuration keys that differ, best scores per task, curves and bars."""
    from classify.compare import SCORES, cell, compare, config_cell

    results, keys, index = compare(runs, out)
    names = [r.name + (f" ({r.folds} folds)" if r.folds else "") for r in results]
    rows = [(k, [config_cell(r, k) for r in results]) for k in keys]
    rows += [(label, [cell(r, k) for r in results]) for label, k in zip(("F1", "acc", "mask F1", "gender F1", "age F1"), SCORES)]
    rows.append(("OOF F1", [f"{r.oof_f1:.4f}" if r.oof_f1 is not None else "" for r in results]))
    # One column per run, one row per key: a few runs stay readable at 80 columns; cells wrap, never "…".
    t = Table(title=f"{len(results)} runs; configuration keys that differ: {escape(', '.join(keys) or 'none')}",
              title_justify="left")
    t.add_column("", overflow="fold")
    for n in names:
        t.add_column(escape(n), justify="right", overflow="fold")
    for label, cells in rows:
        t.add_row(escape(label), *map(escape, cells))
    console.print(t)
    console.print(f"compare: {escape(str(index))}", highlight=False)


if __name__ == "__main__":
    app()
