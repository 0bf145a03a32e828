"""Training: `fit(TrainConfig)` reads only the manifest and writes a self-describing run folder.

RUN/ holds config.json (the resolved config), split.csv, metrics.csv, best.pt (best validation
macro F1), last.pt (with optimizer, scheduler, EMA, for --resume), val_predictions.csv (best epoch),
confusion.png and summary.json. With `--folds K --fold all`, RUN/fold0..K-1 each hold such a run and
RUN/ gets the out-of-fold predictions and score.

The run is made of named steps, each a small function: `prepare_data` (rows, person split, the
labels scored at the competition's boundary), `build_model`, `create_criterion`, `create_optimizer`
(a smaller learning rate for a pretrained backbone), `create_scheduler` (linear warmup, then cosine),
`train_one_epoch`, `validate`, and the checkpointing in `_save_epoch`.

Every random draw is derived from (seed, epoch[, step]): batch order, augmentation (per sample),
mixing, dropout. A run is deterministic on the CPU for a seed, and a resumed run replays exactly the
epochs it had not finished. Under torchrun each rank trains on its share of every global batch with
DistributedDataParallel; validation predictions are gathered so every rank sees the true metrics;
only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import time
import tomllib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from preprocess import labels as L
from preprocess.imageio import atomic_write_bytes
from preprocess.manifest import read_meta

from . import weights as W
from .checkpoint import load_checkpoint, save_checkpoint
from .data import CropDataset, load_rows, person_key, split_persons, write_split
from .distributed import Dist, init_distributed
from .engine import AMP_MODES, EpochOrder, autocast, default_workers, infer, make_loader, resolve_amp
from .errors import ConfigError, TrainingError
from .losses import LOSSES, MultiTaskLoss, make_loss
from .metrics import confusion, scores
from .models import check_model, create_model, freeze_backbone, model_arch, model_kwargs, output_heads
from .plots import plot_confusion
from .tblog import RunLog
from .transforms import PRESETS, build_transform, normalize

MIXES = ("none", "cutmix", "mixup", "vcutmix", "vcutmix-class")


@dataclass(frozen=True)
class TrainConfig:
    crops: str
    out: str
    model: str = "resnet18"           # any torchvision classification model, timm/<name>, or attention
    backbone: str = "resnet18"        # the attention model's backbone (same names)
    dropout: float = 0.2              # before the head (and in the attention model's task branches)
    epochs: int = 10
    batch_size: int = 32              # per process (torchrun: global batch = batch_size x processes)
    accum: int = 1                    # gradient accumulation: one optimizer step every `accum` batches
    lr: float = 1e-3                  # peak learning rate of the head (and of a randomly initialised backbone)
    backbone_lr: float = 0.1          # a pretrained backbone's learning rate, as a fraction of --lr
    weight_decay: float = 1e-4
    optimizer: str = "adamw"          # adam | adamw | sgd
    scheduler: str = "cosine"         # none | cosine | onecycle (all stepped per optimizer step)
    warmup: float = 1.0               # epochs of linear warmup from 1% of the peak (cosine and none)
    clip_grad: float = 0.0            # clip the gradients' global norm to this (0: off)
    ema: float = 0.0                  # decay of an exponential moving average of the weights (0: off)
    patience: int = 0                 # stop after this many epochs without a better validation F1 (0: off)
    img_size: int = 224
    preset: str = "base"              # base | strong | none
    mix: str = "none"                 # none | cutmix | mixup | vcutmix | vcutmix-class (see _mix)
    mix_alpha: float = 1.0
    synth_mask: float = 0.0           # chance that an unmasked training crop gets a drawn mask (classify/masks.py)
    extra: tuple[str, ...] = ()       # crops folders added to training only (e.g. `maskcls pseudo-label`'s)
    loss: str = "wce"                 # wce | ce | smooth | focal | f1 (wce: chosen by bench/finetune.py)
    smoothing: float = 0.1
    gamma: float = 2.0
    task_weighting: str = "uncertainty"  # attention model: fixed | uncertainty
    val_ratio: float = 0.2
    folds: int = 0
    fold: int | str = 0               # 0..folds-1, or "all": every fold into RUN/fold<k>
    seed: int = 42
    old: int = L.DEFAULT_OLD          # the training labels' age boundary
    val_old: int = L.DEFAULT_OLD      # the boundary validation, model selection and evaluate score at
    drop_ages_near: int = 0           # leave out training people within this many years of a boundary
    freeze_backbone: bool = False
    weights: str = "auto"             # auto | imagenet | none | PATH | a torchvision weights set (IMAGENET1K_V1)
    device: str = "auto"
    workers: int | None = None        # DataLoader workers per process (None: from the machine's cores)
    amp: str = "auto"                 # auto | bf16 | fp16 | off (CUDA only)
    compile: bool = False             # torch.compile the model
    sampler: str = "none"             # none | weighted (inverse class frequency)
    label_fixes: str | None = None

    def check(self) -> None:
        """Every value that cannot work is refused here, before any work, naming its option."""
        choices = {"optimizer": ("adam", "adamw", "sgd"), "scheduler": ("none", "cosine", "onecycle"),
                   "preset": PRESETS, "mix": MIXES, "loss": LOSSES,
                   "task_weighting": ("fixed", "uncertainty"), "sampler": ("none", "weighted"), "amp": AMP_MODES}
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise ConfigError(f"--{k.replace('_', '-')} {getattr(self, k)!r}: choose one of {', '.join(allowed)}")
        check_model(self.model, self.backbone)
        ranges = [("epochs", self.epochs >= 1, ">= 1"), ("batch-size", self.batch_size >= 1, ">= 1"),
                  ("accum", self.accum >= 1, ">= 1"), ("img-size", self.img_size >= 32, ">= 32"),
                  ("lr", self.lr > 0, "> 0"), ("weight-decay", self.weight_decay >= 0, ">= 0"),
                  ("backbone-lr", 0 <= self.backbone_lr <= 10, "between 0 and 10 (a fraction of --lr)"),
                  ("warmup", self.warmup >= 0, ">= 0"),
                  ("clip-grad", self.clip_grad >= 0, ">= 0 (0: off)"), ("ema", 0 <= self.ema < 1, "in [0, 1)"),
                  ("patience", self.patience >= 0, ">= 0 (0: off)"), ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                  ("mix-alpha", self.mix_alpha > 0, "> 0"), ("smoothing", 0 <= self.smoothing < 1, "in [0, 1)"),
                  ("synth-mask", 0 <= self.synth_mask <= 1, "in [0, 1] (a probability)"),
                  ("gamma", self.gamma >= 0, ">= 0"), ("val-ratio", 0 < self.val_ratio < 1, "between 0 and 1"),
                  ("folds", self.folds == 0 or self.folds >= 2, "0 (use --val-ratio) or >= 2"),
                  ("old", L.YOUNG < self.old <= 120, f"in {L.YOUNG + 1}..120"),
                  ("val-old", L.YOUNG < self.val_old <= 120, f"in {L.YOUNG + 1}..120"),
                  ("drop-ages-near", 0 <= self.drop_ages_near <= 10, "in 0..10"),
                  ("workers", self.workers is None or self.workers >= 0, ">= 0")]
        for name, ok, allowed in ranges:
            if not ok:
                raise ConfigError(f"--{name} {getattr(self, name.replace('-', '_'))}: must be {allowed}")
        for extra in self.extra:
            if not (Path(extra) / "manifest.csv").is_file():
                raise ConfigError(f"--extra {extra}: not a crops folder (no manifest.csv); give a folder written by "
                                  "`maskcls crop` or `maskcls pseudo-label`")
        if self.fold == "all":
            if self.folds < 2:
                raise ConfigError("--fold all needs --folds K (K >= 2)")
        elif not isinstance(self.fold, int) or (self.folds and not 0 <= self.fold < self.folds):
            raise ConfigError(f"--fold {self.fold!r}: must be all or in 0..{max(self.folds - 1, 0)}")


def load_config(cli: dict, toml_path: Path | None = None) -> TrainConfig:
    """Defaults < TOML file < command line (options left unset on the command line are None)."""
    values = {}
    if toml_path:
        try:
            values = tomllib.loads(Path(toml_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"--config {toml_path}: {e}") from None
        values = values.get("train", values)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"--config {toml_path}: unknown keys {unknown}")
    values.update({k: v for k, v in cli.items() if v is not None and not (k == "extra" and not v)})
    missing = [k for k in ("crops", "out") if k not in values]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}")
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    if "extra" in values:  # a list from the command line or TOML: a tuple of folder names
        values["extra"] = tuple(str(v) for v in ([values["extra"]] if isinstance(values["extra"], str) else values["extra"]))
    if isinstance(values.get("fold"), str) and values["fold"] != "all":
        try:
            values["fold"] = int(values["fold"])
        except ValueError:
            raise ConfigError(f"--fold {values['fold']!r}: must be all or a fold number") from None
    cfg = TrainConfig(**values)
    cfg.check()
    return cfg


RESUMABLE = ("epochs", "device", "workers", "amp", "patience", "compile")


def config_from(saved: dict) -> TrainConfig:
    """The TrainConfig a saved config (checkpoint or config.json) describes; keys it does not know
    (config.json's resolved values, or a newer maskcls's options) are left out, new ones default."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in known}
    if "extra" in values:
        values["extra"] = tuple(values["extra"])
    return TrainConfig(**values)


def _saved_config(out: Path) -> TrainConfig:
    """The config of the run in `out`: from its last.pt, or (a k-fold run, or one stopped before its
    first epoch ended) from its config.json."""
    out = Path(out)
    if (out / "last.pt").is_file():
        saved = load_checkpoint(out / "last.pt")["config"]
    elif (out / "config.json").is_file():
        saved = json.loads((out / "config.json").read_text())
    else:
        raise ConfigError(f"--resume: {out} holds no run (no last.pt or config.json); nothing to resume")
    return config_from(saved)


def resume_config(out: Path, overrides: dict | None = None) -> TrainConfig:
    """The config of the run in `out`, with only --epochs, --device, --workers, --amp, --patience or
    --compile changed. Any other option given with --resume is an error: a resumed run is the same run."""
    saved = _saved_config(out)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    bad = sorted(k for k in overrides if k not in RESUMABLE and overrides[k] != getattr(saved, k))
    if bad:
        raise ConfigError(f"--resume continues the saved run; it accepts only "
                          f"{', '.join('--' + k for k in RESUMABLE)}, not {', '.join('--' + k.replace('_', '-') for k in bad)}")
    cfg = dataclasses.replace(saved, **{k: v for k, v in overrides.items() if k in RESUMABLE})
    cfg.check()
    return cfg


def fit(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
        on_epoch: Callable[[dict], None] | None = None, on_step: Callable[[int, int], None] | None = None,
        warn: Callable[[str], None] = print) -> dict:
    """Train per `cfg`; returns the summary (also written to RUN/summary.json).

    A folder that already holds a run is refused unless `resume` (continue it) or `overwrite`.

    >>> fit(TrainConfig(crops="/tmp/c", out="/tmp/r", model="mobilenet_v2", weights="imagenet", epochs=6))
    >>> fit(TrainConfig(crops="/tmp/c", out="/tmp/r5", folds=5, fold="all"))   # RUN/fold0..4 + out-of-fold score
    """
    d = init_distributed(cfg.device)
    try:
        if not resume and not overwrite:
            _refuse_existing(Path(cfg.out))
        d.barrier()  # every rank has looked before rank 0 writes
        if cfg.fold == "all":
            return _fit_folds(cfg, d, resume, on_epoch, on_step, warn)
        return _fit_one(cfg, d, resume, on_epoch, on_step, warn)
    finally:
        d.close()


def _refuse_existing(out: Path) -> None:
    found = [n for n in ("last.pt", "best.pt", "config.json", "fold0") if (out / n).exists()]
    if found:
        raise ConfigError(f"{out} already holds a run ({', '.join(found)}): add --resume to continue it, "
                          "--overwrite to replace it, or choose another --out")


# -- k-fold ---------------------------------------------------------------------------------------------

def _fold_done(out: Path, epochs: int) -> dict | None:
    if not (out / "summary.json").is_file():
        return None
    s = json.loads((out / "summary.json").read_text())
    return s if s.get("epochs", 0) >= epochs or s.get("stopped_early") else None


def _fit_folds(cfg: TrainConfig, d: Dist, resume: bool, on_epoch, on_step, warn) -> dict:
    """Every fold into RUN/fold<k>, then the out-of-fold score. Resumable fold by fold: finished folds
    are kept, the interrupted one continues from its last.pt, the rest start."""
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.json", json.dumps(asdict(cfg), indent=2).encode())
    folds = []
    for k in range(cfg.folds):
        sub = dataclasses.replace(cfg, fold=k, out=str(out / f"fold{k}"))
        done = _fold_done(Path(sub.out), cfg.epochs) if resume else None
        if done is None:
            tag = (lambda rec, k=k: on_epoch(rec | {"fold": k, "folds": cfg.folds})) if on_epoch else None
            again = resume and (Path(sub.out) / "last.pt").is_file()
            if again:
                sub = resume_config(sub.out, {k2: getattr(cfg, k2) for k2 in RESUMABLE})
            done = _fit_one(sub, d, again, tag, on_step, warn)
        folds.append(done)
        d.barrier()
    summary = {}
    if d.main:
        summary = _write_out_of_fold(out, cfg, folds)
    return summary


def _write_out_of_fold(out: Path, cfg: TrainConfig, folds: list[dict]) -> dict:
    lines, ys, ps = [], [], []
    for k in range(cfg.folds):
        text = (out / f"fold{k}" / "val_predictions.csv").read_text().splitlines()
        if not lines:
            lines.append("fold," + text[0])
        lines += [f"{k},{line}" for line in text[1:]]
        with open(out / f"fold{k}" / "val_predictions.csv", newline="") as f:
            for r in csv.DictReader(f):
                ys.append(int(r["label"]))
                ps.append(int(r["pred"]))
    atomic_write_bytes(out / "oof_predictions.csv", ("\n".join(lines) + "\n").encode())
    keys = [k for k in folds[0]["best"] if k.startswith("val_") and k != "val_loss"]
    per_fold = np.array([[f["best"][k] for k in keys] for f in folds])
    summary = {"folds": cfg.folds, "oof": scores(np.array(ys), np.array(ps)), "oof_photos": len(ys),
               "fold_mean": dict(zip(keys, per_fold.mean(0).tolist())),
               "fold_std": dict(zip(keys, per_fold.std(0).tolist())),
               "per_fold": [{"fold": k, "best_epoch": f["best_epoch"], **{key: f["best"][key] for key in keys}}
                            for k, f in enumerate(folds)],
               "val_old": cfg.val_old, "weights": folds[0].get("weights"),
               "warnings": sorted({w for f in folds for w in f.get("warnings", [])})}
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


# -- one run ----------------------------------------------------------------------------------------------

@dataclass
class Data:
    rows: list[dict]              # every manifest row
    train_rows: list[dict]
    val_rows: list[dict]
    val_labels: np.ndarray        # the validation rows' labels at --val-old (what the competition scores)
    split: dict[str, str]
    dropped_near_boundary: int    # training photos left out by --drop-ages-near
    extra: int = 0                # training photos from --extra folders (the last ones of train_rows)


def boundary_distance(age: int, old: int) -> int:
    """Years to the nearest age-group boundary, counted so that the two ages on either side of a
    boundary are both 1 away (29 and 30 for the boundary 30; 59 and 60 for old = 60)."""
    return min(b - age if age < b else age - b + 1 for b in (L.YOUNG, old))


def prepare_data(cfg: TrainConfig) -> Data:
    """Manifest rows → person-level split. Training labels use --old; validation labels --val-old."""
    crops = Path(cfg.crops)
    rows, usable = load_rows(crops, cfg.old, Path(cfg.label_fixes) if cfg.label_fixes else None)
    if not usable:
        raise ConfigError(f"{crops}/manifest.csv has no photo with a known label and a usable crop")
    split = split_persons(usable, cfg.seed, cfg.val_ratio, cfg.folds, 0 if cfg.fold == "all" else cfg.fold)
    train_rows = [r for r in usable if split[person_key(r)] == "train"]
    val_rows = [r for r in usable if split[person_key(r)] == "val"]
    dropped = 0
    if cfg.drop_ages_near:
        kept = [r for r in train_rows if boundary_distance(r["age"], cfg.old) > cfg.drop_ages_near]
        dropped, train_rows = len(train_rows) - len(kept), kept
    if not train_rows or not val_rows:
        raise ConfigError(f"the split left {len(train_rows)} training and {len(val_rows)} validation photos; "
                          "use more people or another --val-ratio/--folds")
    val_labels = np.array([L.encode(r["mask"], r["gender"], L.age_group(r["age"], cfg.val_old)) for r in val_rows])
    extra = extra_rows(cfg)
    return Data(rows, train_rows + extra, val_rows, val_labels, split, dropped, len(extra))


def extra_rows(cfg: TrainConfig) -> list[dict]:
    """The usable rows of every --extra crops folder, for training only (never validation: each is
    read from its own folder and joins no split). Their `index` is offset per folder so that their
    augmentation seeds differ from the main folder's."""
    out = []
    from .pseudo import check_extra  # pseudo imports predict: only when there is an extra folder

    for k, folder in enumerate(cfg.extra, start=1):
        check_extra(Path(folder), cfg.old)
        _, usable = load_rows(Path(folder), cfg.old)
        for r in usable:
            out.append(r | {"root": str(Path(folder).resolve()), "index": k * 10_000_000 + r["index"]})
    return out


def build_model(cfg: TrainConfig, weights: str) -> tuple[nn.Module, dict, dict]:
    """(model, its constructor kwargs, its input normalisation {mean, std, interpolation}). The model
    is checked to take --img-size before any training."""
    kwargs = model_kwargs(cfg.model, cfg.backbone if cfg.model == "attention" else None, cfg.dropout)
    model = create_model(cfg.model, weights=weights, **kwargs)
    norm = W.data_config(model.backbone.arch, model.backbone.net, weights)
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, cfg.img_size, cfg.img_size))
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ConfigError(f"{model.backbone.arch} cannot take --img-size {cfg.img_size}: "
                          f"{str(e).splitlines()[0] or type(e).__name__}") from None
    if cfg.freeze_backbone:
        freeze_backbone(model)
    return model, kwargs, norm


def create_criterion(cfg: TrainConfig, model: nn.Module, train_labels: np.ndarray) -> MultiTaskLoss:
    """One loss per head the model returns (the 18 classes; the attention model also each task),
    combined by --task-weighting. --loss wce weighs each head's classes by their training counts."""
    heads = output_heads(model)
    parts = dict(zip(L.TASKS, L.task_parts(train_labels)))
    counts = {"label": np.bincount(train_labels, minlength=L.NUM_CLASSES)} | {
        t: np.bincount(parts[t], minlength=len(L.TASKS[t])) for t in L.TASKS}
    fns = {h: make_loss(cfg.loss, cfg.smoothing, cfg.gamma, counts[h]) for h in heads}
    return MultiTaskLoss(fns, heads, cfg.task_weighting if len(heads) > 1 else "fixed")


def create_optimizer(cfg: TrainConfig, model: nn.Module, criterion: nn.Module, pretrained: bool):
    """Parameter groups: the backbone (at --lr x --backbone-lr when pretrained), the heads at --lr,
    the loss's task weights at --lr without weight decay."""
    own = {id(p) for p in model.backbone.parameters()}
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    loss = [p for p in criterion.parameters() if p.requires_grad]
    groups = [{"params": heads, "lr": cfg.lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr * (cfg.backbone_lr if pretrained else 1.0), "name": "backbone"})
    if loss:
        groups.append({"params": loss, "lr": cfg.lr, "weight_decay": 0.0, "name": "loss"})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def create_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """Per optimizer step: linear warmup over --warmup epochs (at most half the run) from 1% of each
    group's peak, then cosine to zero (or constant for --scheduler none); onecycle is torch's OneCycleLR."""
    S = torch.optim.lr_scheduler
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.scheduler == "onecycle":
        return S.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total)
    warm = min(round(cfg.warmup * steps_per_epoch), total // 2)
    main = (S.CosineAnnealingLR(optimizer, T_max=total - warm) if cfg.scheduler == "cosine"
            else S.ConstantLR(optimizer, factor=1.0, total_iters=0))
    if warm == 0:
        return main
    return S.SequentialLR(optimizer, [S.LinearLR(optimizer, start_factor=0.01, total_iters=warm), main],
                          milestones=[warm])


@dataclass
class Trainer:
    """What one epoch of training needs, built once per run."""
    cfg: TrainConfig
    d: Dist
    model: nn.Module              # the model itself (its state is what checkpoints hold)
    net: nn.Module                # what the step runs: the model, maybe in DDP and compiled
    criterion: MultiTaskLoss
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    ema: torch.optim.swa_utils.AveragedModel | None
    amp: str
    norm: dict


def train_one_epoch(t: Trainer, loader, epoch: int, on_step=None) -> dict:
    """One pass over the loader; returns the mean loss per head. Gradients accumulate over --accum
    batches; the only host synchronisation per step is the finite-loss check, agreed across ranks."""
    cfg, d, device = t.cfg, t.d, t.d.device
    t.net.train()
    sums, n, total, items = {}, 0, len(loader), len(loader.sampler)
    params = [p for g in t.optimizer.param_groups for p in g["params"]]
    for step, (x, y, _) in enumerate(loader):
        group_end = min((step // cfg.accum + 1) * cfg.accum, total)
        first = (step // cfg.accum) * cfg.accum * cfg.batch_size
        share = x.shape[0] / min(cfg.accum * cfg.batch_size, items - first)  # of the group's samples: exact means
        x = normalize(x.to(device, non_blocking=True), t.norm["mean"], t.norm["std"], channels_last=device.type == "cuda")
        y = y.to(device, non_blocking=True)
        x, y_b, lam = _mix(cfg, x, y, epoch, step, d.rank)
        sync = d.world == 1 or step + 1 == group_end
        with (contextlib.nullcontext() if sync else t.net.no_sync()):
            with autocast(device, t.amp):
                outputs = t.net(x)
            loss, parts = t.criterion(outputs, y, y_b, lam)
            if d.any(torch.logical_not(torch.isfinite(loss.detach())).to(torch.float32)):
                kept = f"last.pt holds epoch {epoch}" if epoch > 0 else "no checkpoint was written yet"
                what = f"the loss became {loss.item()}" if not math.isfinite(loss.item()) else \
                    "the loss became non-finite in another process"
                raise TrainingError(f"{what} at epoch {epoch + 1}, step {step + 1}; "
                                    f"training stopped ({kept}). Try a lower --lr.")
            t.scaler.scale(loss * share).backward()
        if step + 1 == group_end:
            d.average_grads(t.criterion.parameters())
            if cfg.clip_grad:
                t.scaler.unscale_(t.optimizer)
                nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            t.scaler.step(t.optimizer)
            t.scaler.update()
            t.optimizer.zero_grad(set_to_none=True)
            t.scheduler.step()
            if t.ema is not None:
                t.ema.update_parameters(t.model)
        for k, v in {"loss": loss.detach(), **{f"loss_{h}": p for h, p in parts.items()}}.items():
            sums[k] = sums.get(k, 0.0) + v  # device tensors: summed without a host sync
        n += 1
        if on_step:
            on_step(step + 1, total)
    return {k: d.mean(float(v) / max(n, 1)) for k, v in sums.items()}


def validate(model, data: Data, loader, t: Trainer):
    """(manifest indices, probabilities, labels at --val-old, metrics) of every validation photo:
    each rank infers its share, then all ranks gather all."""
    idx, probs = infer(model, loader, t.d.device, tta=1, amp=t.amp, mean=t.norm["mean"], std=t.norm["std"])
    parts = t.d.gather((idx, probs))
    idx = np.concatenate([p[0] for p in parts])
    probs = np.concatenate([p[1] for p in parts])
    order = np.argsort(idx, kind="stable")
    idx, probs = idx[order], probs[order]
    pos = {r["index"]: k for k, r in enumerate(data.val_rows)}
    y = data.val_labels[[pos[i] for i in idx]]
    m = scores(y, probs.argmax(1))
    m["loss"] = float(-np.log(probs[np.arange(len(y)), y] + 1e-12).mean())
    return idx, probs, y, m


def _fit_one(cfg: TrainConfig, d: Dist, resume: bool, on_epoch, on_step, warn) -> dict:
    out = Path(cfg.out)
    state = _resume_state(cfg, out) if resume else None
    data = prepare_data(cfg)
    weights, note = _resolve_weights(cfg, d, state)
    if note and d.main and state is None:
        warn(note)
    t, kwargs, steps_per_epoch = build_trainer(cfg, d, data, weights if state is None else "none")
    start, best_f1, best_epoch, history = 0, -1.0, 0, []
    if state is not None:
        start, best_f1, history = _restore(t, state, cfg, steps_per_epoch)
        best_epoch = max(history, key=lambda r: r["val_f1"])["epoch"] if history else 0
    workers = cfg.workers if cfg.workers is not None else default_workers(d.world)
    if d.main:
        _write_start(out, cfg, data, t, weights, workers)
    describe = {"model": {"name": cfg.model, "kwargs": kwargs}, "classes": L.class_names(cfg.old),
                "tasks": {task: list(n) for task, n in L.TASKS.items()} | {"age": list(L.age_names(cfg.old))},
                "img_size": cfg.img_size, "mean": t.norm["mean"], "std": t.norm["std"],
                "interpolation": t.norm["interpolation"], "preset": cfg.preset, "crop": read_meta(Path(cfg.crops)),
                "config": asdict(cfg), "weights": weights, "weights_note": note}
    interp = t.norm["interpolation"]
    train_ds = CropDataset(cfg.crops, data.train_rows, build_transform(cfg.preset, cfg.img_size, True, interp), cfg.seed,
                           cfg.synth_mask)
    val_ds = CropDataset(cfg.crops, data.val_rows, build_transform(cfg.preset, cfg.img_size, False, interp), cfg.seed)
    order = EpochOrder()
    loader = make_loader(train_ds, cfg.batch_size, workers, d.device, sampler=order, persistent=True)
    val_loader = make_loader(val_ds, cfg.batch_size, workers, d.device,
                             sampler=list(range(d.rank, len(data.val_rows), d.world)), persistent=True)
    label_counts = np.bincount([r["label"] for r in data.train_rows], minlength=L.NUM_CLASSES)
    log = RunLog(out, enabled=d.main)
    if log.note:
        _warn_once(warn, log.note)
    if start == 0 and log.writer is not None:
        first = list(range(min(8, len(val_ds))))
        log.crops(np.stack([val_ds[i][0].numpy() for i in first]) if first else np.zeros(0),
                  [L.class_names(cfg.val_old)[int(data.val_labels[i])] for i in first])
    best_val, stopped_early = None, False
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: a function of the epoch, so resume replays it
        order.set(_epoch_order(cfg, epoch, train_ds, label_counts, d), epoch)
        train_stats = train_one_epoch(t, loader, epoch, on_step)
        val, source, record = _validate_epoch(t, data, val_loader)
        record = {"epoch": epoch + 1, "train_loss": train_stats["loss"],
                  **{f"train_{k}": v for k, v in train_stats.items() if k != "loss"}, **record,
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        log.epoch(record)
        improved = record["val_f1"] > best_f1
        if improved:
            best_f1, best_epoch, best_val = record["val_f1"], epoch + 1, val[:3]
        stopped_early = bool(cfg.patience) and epoch + 1 - best_epoch >= cfg.patience and epoch + 1 < cfg.epochs
        if d.main:
            best_state = (t.ema.module if source == "ema" else t.model).state_dict()
            _save_epoch(out, t, describe, history, record, epoch, best_f1, improved, best_state, data.rows, best_val,
                        stopped_early)
        if on_epoch:
            on_epoch(record | {"best": improved})
        if stopped_early:
            break
    log.close()
    return _finish(out, cfg, data, history, best_val, weights, note, d, stopped_early) if d.main else {}


def _resume_state(cfg: TrainConfig, out: Path) -> dict | None:
    """last.pt of the run to continue (None: stopped before its first epoch ended, so it starts over),
    refused if `cfg` differs from its config beyond what --resume may change."""
    if not (out / "last.pt").is_file():
        return None
    state = load_checkpoint(out / "last.pt")
    saved = config_from(state["config"])
    changed = sorted(k for k in asdict(cfg) if k not in RESUMABLE and getattr(cfg, k) != getattr(saved, k))
    if changed:
        raise ConfigError(f"--resume continues {out} as it was configured; these differ from its config: "
                          f"{', '.join(changed)} (build the config with resume_config)")
    return state


def _resolve_weights(cfg: TrainConfig, d: Dist, state: dict | None) -> tuple[str, str | None]:
    """(weights, warning): what the run starts from (a resumed run: what it started from)."""
    if state is not None:
        return state.get("weights", "none"), state.get("weights_note")
    arch = model_arch(cfg.model, model_kwargs(cfg.model, cfg.backbone))
    if not d.main:
        d.barrier()  # rank 0 downloads first; the others then find the file in the cache
    resolved = W.resolve(cfg.weights, arch)
    if d.main:
        d.barrier()
    return resolved


def build_trainer(cfg: TrainConfig, d: Dist, data: Data, weights: str) -> tuple[Trainer, dict, int]:
    """(the trainer, the model's constructor kwargs, optimizer steps per epoch): the model on its
    device (channels_last, cudnn.benchmark on CUDA; DDP under torchrun; compiled if asked), its
    loss, optimizer, schedule, gradient scaler and EMA."""
    device = d.device
    torch.manual_seed(cfg.seed)
    model, kwargs, norm = build_model(cfg, weights)
    criterion = create_criterion(cfg, model, np.array([r["label"] for r in data.train_rows]))
    model.to(device)
    criterion.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    net: nn.Module = model
    if d.world > 1:
        if device.type == "cuda":
            # BatchNorm statistics over the global batch, as one process would compute them (gloo on the
            # CPU has no SyncBatchNorm: there each rank normalises over its own share).
            net = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    optimizer = create_optimizer(cfg, model, criterion, pretrained=weights != "none")
    batches = math.ceil(math.ceil(len(data.train_rows) / d.world) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches / cfg.accum)
    ema = None
    if cfg.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    amp = resolve_amp(cfg.amp, device)
    t = Trainer(cfg, d, model, net, criterion, optimizer, create_scheduler(cfg, optimizer, steps_per_epoch),
                torch.amp.GradScaler(device.type, enabled=amp == "fp16"), ema, amp, norm)
    return t, kwargs, steps_per_epoch


def _validate_epoch(t: Trainer, data: Data, loader):
    """Validate the model (and its EMA, keeping whichever scores the better macro F1): (validation
    result, 'model' | 'ema', the epoch's record of validation metrics and learning rates)."""
    val, source, extra = validate(t.model, data, loader, t), "model", {}
    if t.ema is not None:
        ema_val = validate(t.ema.module, data, loader, t)
        extra = {"model_val_f1": val[3]["f1"], "ema_val_f1": ema_val[3]["f1"]}
        if ema_val[3]["f1"] > val[3]["f1"]:
            val, source = ema_val, "ema"
    m = dict(val[3])
    record = {"val_loss": m.pop("loss"), **{f"val_{k}": v for k, v in m.items()}, **extra,
              "lr": t.optimizer.param_groups[0]["lr"], "lr_backbone": _group_lr(t.optimizer, "backbone")}
    if t.ema is not None:
        record["weights_from"] = source
    if t.criterion.weighting == "uncertainty":
        record |= {f"weight_{h}": float(torch.exp(-t.criterion.log_vars[i].detach()))
                   for i, h in enumerate(t.criterion.heads)}
    return val, source, record


def _write_start(out: Path, cfg: TrainConfig, data: Data, t: Trainer, weights: str, workers: int) -> None:
    """config.json (the resolved config) and split.csv (people left out by --drop-ages-near: 'dropped')."""
    out.mkdir(parents=True, exist_ok=True)
    resolved = asdict(cfg) | {"weights_resolved": weights, "device_resolved": str(t.d.device), "world_size": t.d.world,
                              "workers_resolved": workers, "amp_resolved": t.amp, "normalisation": t.norm}
    atomic_write_bytes(out / "config.json", json.dumps(resolved, indent=2).encode())
    kept = {person_key(r) for r in data.train_rows}
    extra = {person_key(r): "extra" for r in data.train_rows[len(data.train_rows) - data.extra:]}
    write_split(out / "split.csv", {p: "dropped" if s == "train" and p not in kept else s for p, s in data.split.items()}
                | extra)


_WARNED: set[str] = set()


def _warn_once(warn, message: str) -> None:
    """A note that holds for the whole process (every fold of a k-fold run), said once."""
    if message not in _WARNED:
        _WARNED.add(message)
        warn(message)


def _group_lr(optimizer, name: str):
    return next((g["lr"] for g in optimizer.param_groups if g.get("name") == name), "")


def _restore(t: Trainer, state: dict, cfg: TrainConfig, steps_per_epoch: int):
    """Load last.pt into the trainer. The schedule is rebuilt for this config and replayed to the
    step reached, so `--resume --epochs N` continues as if N epochs had been planned from the start."""
    t.model.load_state_dict(state["model_state"])
    t.criterion.load_state_dict(state["loss_state"])
    t.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    if t.ema is not None and state.get("ema_state"):
        t.ema.load_state_dict(state["ema_state"])
    for g in t.optimizer.param_groups:
        g["lr"] = g["initial_lr"]
    t.scheduler = create_scheduler(cfg, t.optimizer, steps_per_epoch)
    with warnings.catch_warnings():  # replaying the schedule, without optimizer steps in this process
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        for _ in range((state["epoch"] + 1) * steps_per_epoch):
            t.scheduler.step()
    return state["epoch"] + 1, state["best_f1"], state["history"]


def _save_epoch(out: Path, t: Trainer, describe: dict, history, record, epoch, best_f1, improved, best_state,
                rows, best_val, stopped_early) -> None:
    payload = describe | {"epoch": epoch, "metrics": record, "best_f1": best_f1, "history": history}
    if improved:
        save_checkpoint(out / "best.pt", payload | {"model_state": best_state})
        _write_val_predictions(out, rows, *best_val)
    save_checkpoint(out / "last.pt", payload | {
        "model_state": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
        "scaler": t.scaler.state_dict(), "loss_state": t.criterion.state_dict(),
        "ema_state": t.ema.state_dict() if t.ema is not None else None, "stopped_early": stopped_early})
    _write_metrics(out / "metrics.csv", history)


def _finish(out: Path, cfg: TrainConfig, data: Data, history, best_val, weights, note, d: Dist,
            stopped_early: bool) -> dict:
    best = max(history, key=lambda r: r["val_f1"])
    if best_val is None:  # resumed after the best epoch: its predictions are already on disk
        best_val = _read_val_predictions(out)
    plot_confusion(out / "confusion.png", confusion(best_val[2], best_val[1].argmax(1), L.NUM_CLASSES),
                   L.class_names(cfg.val_old), f"validation, epoch {best['epoch']} (macro F1 {best['val_f1']:.3f})")
    summary = {"best_epoch": best["epoch"], "best": best, "last": history[-1], "epochs": len(history),
               "stopped_early": stopped_early, "train_photos": len(data.train_rows), "val_photos": len(data.val_rows),
               "extra_photos": data.extra,
               "train_people": len({person_key(r) for r in data.train_rows}),
               "val_people": len({person_key(r) for r in data.val_rows}),
               "excluded_photos": len(data.rows) - (len(data.train_rows) - data.extra) - len(data.val_rows)
               - data.dropped_near_boundary,
               "dropped_near_boundary": data.dropped_near_boundary, "val_old": cfg.val_old,
               "weights": weights, "warnings": [note] if note else [], "device": str(d.device), "world_size": d.world}
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def _epoch_order(cfg: TrainConfig, epoch: int, ds: CropDataset, label_counts, d: Dist) -> list[int]:
    """This rank's sample order for the epoch. The global order depends only on (seed, epoch); rank r
    takes every world-th item, so the ranks' batches together are the one-process batches."""
    g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
    n = len(ds)
    if cfg.sampler == "weighted":
        w = 1.0 / torch.tensor(label_counts, dtype=torch.double).clamp(min=1)
        order = torch.multinomial(w[ds.labels], n, replacement=True, generator=g).tolist()
    else:
        order = torch.randperm(n, generator=g).tolist()
    if d.world > 1:
        order += order[: (-n) % d.world]  # pad to a multiple of the world size, as DistributedSampler does
        order = order[d.rank::d.world]
    return order


def _mix(cfg: TrainConfig, x, y, epoch: int, step: int, rank: int):
    """(mixed batch, partner labels or None, lam): the loss is lam * L(y) + (1 - lam) * L(partner's y).

    vcutmix (label-preserving CutMix): each photo takes the left or right half from another photo of
    the batch with the same mask status (vcutmix-class: the same class); lam = 1/2, and where the two
    classes are equal the mixed loss is that class's loss, so the label only mixes where they differ
    (never in the mask task). A photo with no such partner in the batch stays whole."""
    if cfg.mix == "none":
        return x, None, 1.0
    rng = np.random.default_rng([cfg.seed, epoch, step, rank])
    if cfg.mix in ("vcutmix", "vcutmix-class"):
        n, w = x.shape[0], x.shape[-1]
        key = y if cfg.mix == "vcutmix-class" else L.task_parts(y)[0]
        same = (key[:, None] == key[None, :]) & ~torch.eye(n, dtype=torch.bool, device=y.device)
        noise = torch.as_tensor(rng.random((n, n)), device=y.device) + 1  # a random partner among the allowed
        partner = torch.where(same.any(1), (noise * same).argmax(1), torch.arange(n, device=y.device))
        right = torch.as_tensor(rng.random(n) < 0.5, device=x.device)
        half = (torch.arange(w, device=x.device) >= w // 2)[None, :] == right[:, None]  # n x w: columns taken
        x = torch.where(half[:, None, None, :], x[partner], x)
        return x, y[partner], 0.5
    lam = float(rng.beta(cfg.mix_alpha, cfg.mix_alpha))
    perm = torch.as_tensor(rng.permutation(x.shape[0]), device=x.device)
    if cfg.mix == "mixup":
        return lam * x + (1 - lam) * x[perm], y[perm], lam
    h, w = x.shape[-2:]
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
    return x, y[perm], lam


def _write_metrics(path: Path, history: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in history for k in r))
    lines = [",".join(cols)] + [",".join(_num(r.get(c, "")) for c in cols) for r in history]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def _num(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _write_val_predictions(out: Path, rows, idx, probs, y) -> None:
    lines = [",".join(["image_id", "label", "pred"] + [f"p{k}" for k in range(L.NUM_CLASSES)])]
    for i, p, t in zip(idx, probs, y):
        lines.append(",".join([_csv_field(rows[i]["image_id"]), str(t), str(int(p.argmax()))] + [f"{v:.8f}" for v in p]))
    atomic_write_bytes(out / "val_predictions.csv", ("\n".join(lines) + "\n").encode())


def _csv_field(s: str) -> str:
    return f'"{s.replace(chr(34), chr(34) * 2)}"' if any(c in s for c in ',"\n') else s


def _read_val_predictions(out: Path):
    with open(out / "val_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    probs = np.array([[float(r[f"p{k}"]) for k in range(L.NUM_CLASSES)] for r in rows])
    return np.arange(len(rows)), probs, np.array([int(r["label"]) for r in rows])
