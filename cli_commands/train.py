"""`maskcls train`: crops → a run folder (RUN/best.pt, metrics, predictions), with a table per epoch."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import LazyProgress, check_outputs, console, require_extra, user_errors, warning


@user_errors
def train(
    ctx: typer.Context,
    crops: Optional[Path] = typer.Argument(None, metavar="CROPS", help="Crops folder written by `maskcls crop`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (config, split, metrics, checkpoints). (required, unless --config names out)"),
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
    groups: Optional[Path] = typer.Option(None, help="CSV person_id,group: people who are one human (a face under two "
                                                     "ids) land on one side of the split, in one fold."),
    calibrate: Optional[bool] = typer.Option(None, "--calibrate/--no-calibrate", metavar="",
                                             help="Fit a temperature on the validation predictions after training, "
                                                  "stored in best.pt (default: on)."),
    resume: bool = typer.Option(False, "--resume", metavar="", help="Continue the run in --out (a k-fold run: fold by fold)."),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="", help="Replace the run already in --out (refused where --out also holds files no run writes)."),
):
    """Train a classifier on the crops (person-level split); writes RUN/best.pt and friends."""
    check_outputs(folders={"--out": out})
    from classify.errors import ConfigError
    from classify.training.config import load_config, resume_config
    from classify.training.train import fit
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
    if any(str(name).startswith("timm/") for name in (cfg.model, cfg.backbone)):
        require_extra("timm", f"--model {cfg.model}" + (f" --backbone {cfg.backbone}" if cfg.model == "attention" else ""))
    rank = dist_env()[0]
    t0 = time.perf_counter()
    with EpochView(cfg.epochs, quiet=rank != 0) as view:
        summary = fit(cfg, resume=resume, overwrite=overwrite, on_epoch=view.epoch, on_step=view.step, warn=warning)
    if rank == 0:
        _train_summary(cfg, summary, time.perf_counter() - t0)


class EpochView:
    """What rank 0 shows while training: a progress bar per epoch, then that epoch's scores as a table."""

    def __init__(self, epochs: int, quiet: bool):
        self.epochs, self.quiet, self.bar = epochs, quiet, None

    def epoch(self, rec: dict) -> None:
        if self.quiet:
            return
        fold_tag = f"fold {rec['fold'] + 1}/{rec['folds']}, " if "fold" in rec else ""
        t = Table(title=f"{fold_tag}epoch {rec['epoch']}/{self.epochs}" + ("  [green]best[/]" if rec["best"] else ""),
                  title_justify="left")
        for c in ("loss", "val loss", "acc", "F1", "mask F1", "gend F1", "age F1", "lr", "sec"):
            t.add_column(c, justify="right")
        t.add_row(f"{rec['train_loss']:.4f}", f"{rec['val_loss']:.4f}", f"{rec['val_acc']:.3f}", f"{rec['val_f1']:.3f}",
                  f"{rec['val_mask_f1']:.3f}", f"{rec['val_gender_f1']:.3f}", f"{rec['val_age_f1']:.3f}",
                  f"{rec['lr']:.0e}", f"{rec['seconds']:.0f}")
        console.print(t)

    def step(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None or done == 1:
            self._close_bar()
            self.bar = LazyProgress("train", unit="batches")
        self.bar.update(done, total)
        if done == total:
            self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.__exit__()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._close_bar()


def calibration_line(c: dict) -> str:
    """One sentence: what was fitted, what is applied, and the ECE before and after what is applied."""
    on = f"{c['photos']} validation photos"
    if c.get("kept"):
        return (f"calibration: T = {c['fitted']:.3g} fitted on {on} but not trusted ({c['kept'].split(': ', 1)[-1]}); "
                f"T = 1 applied, expected calibration error {c['ece_before']:.4f} (unchanged)")
    return (f"calibration: T = {c['temperature']:.3g} fitted on {on} and applied; expected calibration error "
            f"{c['ece_before']:.4f} before, {c['ece_after']:.4f} after")


def not_learned_caution(unlearned: dict, on: str) -> str | None:
    from classify.metrics import not_learned_caution as caution

    return caution(unlearned, on)


def label_fixes_line(f: dict) -> str:
    return (f"label fixes: {escape(f['file'])}: {f['fixes']} fix(es) on {f['photos']} photos changed the label of "
            f"{f['changed']} photos of {f['people']} people (recorded in summary.json)")


def _calibration_line(c: dict | None) -> None:
    if c:
        console.print(calibration_line(c), highlight=False)
        if c.get("caution"):
            warning(c["caution"])


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
    if summary.get("label_fixes"):
        console.print(label_fixes_line(summary["label_fixes"]), highlight=False)
    if summary.get("groups"):
        g = summary["groups"]
        console.print(f"groups: {escape(g['file'])}: {g['people']} people in {g['groups']} group(s), each group on one "
                      "side of the split" + (" (one fold)" if "oof" in summary else ""), highlight=False)
    v = summary.get("validation") or {}
    caution = not_learned_caution({t: tuple(ab) for t, ab in (v.get("not_learned") or {}).items()}, v.get("on", ""))
    if caution:
        warning(caution)
    if summary.get("warnings"):  # said in full when they arose; the summary points back at them
        console.print(f"[yellow]{len(summary['warnings'])} warning(s)[/] above (also in summary.json): "
                      + escape("; ".join(w.split(":")[0] for w in summary["warnings"])), highlight=False, soft_wrap=True)
