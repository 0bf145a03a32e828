"""Training: `fit(TrainConfig)` reads only the manifest and writes a self-describing run folder.

RUN/ holds config.json (the resolved config), split.csv, metrics.csv, best.pt (best validation
macro F1), last.pt (with optimizer and scheduler, for --resume), val_predictions.csv (best epoch),
confusion.png and summary.json.

Every random draw is derived from (seed, epoch[, step]): batch order, augmentation (per sample),
mixing, dropout. A run is deterministic on the CPU for a seed, and a resumed run replays exactly the
epochs it had not finished. Under torchrun each rank trains on its share of every global batch with
DistributedDataParallel; validation predictions are gathered so every rank sees the true metrics;
only rank 0 writes.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from preprocess import labels as L
from preprocess.imageio import atomic_write_bytes
from preprocess.manifest import read_meta

from .checkpoint import load_checkpoint, save_checkpoint
from .data import CropDataset, load_rows, person_key, split_persons, write_split
from .distributed import Dist, init_distributed
from .engine import autocast, infer, make_loader
from .errors import ConfigError, TrainingError
from .losses import LOSSES, MultiTaskLoss, make_loss
from .metrics import confusion, scores
from .plots import plot_confusion
from .models import create_model, freeze_backbone, list_models, model_kwargs, resolve_weights
from .transforms import IMAGENET_MEAN, IMAGENET_STD, PRESETS, build_transform, normalize


@dataclass(frozen=True)
class TrainConfig:
    crops: str
    out: str
    model: str = "resnet18"
    backbone: str = "resnet18"        # the attention model's backbone
    dropout: float = 0.2              # before the head (and in the attention model's task branches)
    epochs: int = 10
    batch_size: int = 32              # per process (torchrun: global batch = batch_size x processes)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"          # adam | adamw | sgd
    scheduler: str = "cosine"         # none | cosine | onecycle (both stepped per batch)
    img_size: int = 224
    preset: str = "base"              # base | strong | none
    mix: str = "none"                 # none | cutmix | mixup
    mix_alpha: float = 1.0
    loss: str = "ce"                  # ce | smooth | focal | f1
    smoothing: float = 0.1
    gamma: float = 2.0
    task_weighting: str = "uncertainty"  # attention model: fixed | uncertainty
    val_ratio: float = 0.2
    folds: int = 0
    fold: int = 0
    seed: int = 42
    old: int = L.DEFAULT_OLD
    freeze_backbone: bool = False
    weights: str = "auto"             # auto | imagenet | none | PATH
    device: str = "auto"
    workers: int = 2
    amp: bool = True                  # bf16 autocast + channels_last, CUDA only
    sampler: str = "none"             # none | weighted (inverse class frequency)
    label_fixes: str | None = None

    def check(self) -> None:
        choices = {"optimizer": ("adam", "adamw", "sgd"), "scheduler": ("none", "cosine", "onecycle"),
                   "preset": PRESETS, "mix": ("none", "cutmix", "mixup"), "loss": LOSSES,
                   "task_weighting": ("fixed", "uncertainty"), "sampler": ("none", "weighted"),
                   "model": tuple(list_models())}
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise ConfigError(f"--{k.replace('_', '-')} {getattr(self, k)!r}: choose one of {', '.join(allowed)}")
        if self.epochs < 1 or self.batch_size < 1 or self.img_size < 32:
            raise ConfigError("--epochs and --batch-size must be >= 1 and --img-size >= 32")


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
    values.update({k: v for k, v in cli.items() if v is not None})
    missing = [k for k in ("crops", "out") if k not in values]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}")
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    cfg = TrainConfig(**values)
    cfg.check()
    return cfg


RESUMABLE = ("epochs", "device", "workers", "amp")


def _last_checkpoint(out: Path) -> Path:
    last = Path(out) / "last.pt"
    if not last.is_file():
        raise ConfigError(f"--resume: {last} does not exist; nothing to resume")
    return last


def resume_config(out: Path, overrides: dict | None = None) -> TrainConfig:
    """The config of the run in `out` (from its last.pt), with only --epochs, --device, --workers or
    --amp changed. Any other option given with --resume is an error: a resumed run is the same run."""
    saved = TrainConfig(**load_checkpoint(_last_checkpoint(out))["config"])
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    bad = sorted(k for k in overrides if k not in RESUMABLE and overrides[k] != getattr(saved, k))
    if bad:
        raise ConfigError(f"--resume continues the saved run; it accepts only "
                          f"{', '.join('--' + k for k in RESUMABLE)}, not {', '.join('--' + k.replace('_', '-') for k in bad)}")
    return dataclasses.replace(saved, **{k: v for k, v in overrides.items() if k in RESUMABLE})


def fit(cfg: TrainConfig, resume: bool = False, on_epoch: Callable[[dict], None] | None = None,
        on_step: Callable[[int, int], None] | None = None, warn: Callable[[str], None] = print) -> dict:
    """Train per `cfg`; returns the summary (also written to RUN/summary.json).

    >>> fit(TrainConfig(crops="/tmp/c", out="/tmp/r", model="resnet18", epochs=2))
    """
    d = init_distributed(cfg.device)
    try:
        return _fit(cfg, d, resume, on_epoch, on_step, warn)
    finally:
        d.close()


def _fit(cfg: TrainConfig, d: Dist, resume: bool, on_epoch, on_step, warn) -> dict:
    out, crops = Path(cfg.out), Path(cfg.crops)
    state = None
    if resume:
        state = load_checkpoint(_last_checkpoint(out))
        saved = TrainConfig(**state["config"])
        changed = sorted(k for k in asdict(cfg) if k not in RESUMABLE and getattr(cfg, k) != getattr(saved, k))
        if changed:
            raise ConfigError(f"--resume continues {out} as it was configured; these differ from its config: "
                              f"{', '.join(changed)} (build the config with resume_config)")
    device = d.device
    rows, usable = load_rows(crops, cfg.old, Path(cfg.label_fixes) if cfg.label_fixes else None)
    if not usable:
        raise ConfigError(f"{crops}/manifest.csv has no photo with a known label and a usable crop")
    split = split_persons(usable, cfg.seed, cfg.val_ratio, cfg.folds, cfg.fold)
    train_rows = [r for r in usable if split[person_key(r)] == "train"]
    val_rows = [r for r in usable if split[person_key(r)] == "val"]
    if not train_rows or not val_rows:
        raise ConfigError(f"the split left {len(train_rows)} training and {len(val_rows)} validation photos; "
                          "use more people or another --val-ratio/--folds")

    weights = resolve_weights(cfg.weights, cfg.backbone if cfg.model == "attention" else cfg.model)
    if cfg.weights == "auto" and weights == "none" and d.main and state is None:
        warn("no ImageNet weights in the torch hub cache: training from random init "
             "(see `--weights` in the README to use pretrained weights offline)")
    torch.manual_seed(cfg.seed)
    train_ds = CropDataset(crops, train_rows, build_transform(cfg.preset, cfg.img_size, True), cfg.seed)
    eval_tf = build_transform(cfg.preset, cfg.img_size, train=False)
    val_ds = CropDataset(crops, val_rows, eval_tf, cfg.seed)

    kwargs = model_kwargs(cfg.model, cfg.backbone, cfg.dropout)
    model = create_model(cfg.model, weights=weights if state is None else "none", **kwargs)
    if cfg.freeze_backbone:
        freeze_backbone(model)
    heads = ("label", "mask", "gender", "age") if cfg.model == "attention" else ("label",)
    criterion = MultiTaskLoss(make_loss(cfg.loss, cfg.smoothing, cfg.gamma), heads,
                              cfg.task_weighting if cfg.model == "attention" else "fixed")
    use_amp = cfg.amp and device.type == "cuda"
    model.to(device)
    criterion.to(device)
    if use_amp:
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if d.world > 1:
        if device.type == "cuda":
            # BatchNorm statistics over the global batch, as one process would compute them (gloo on the
            # CPU has no SyncBatchNorm: there each rank normalises over its own share).
            net = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    params = [p for p in model.parameters() if p.requires_grad] + [p for p in criterion.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, params)
    steps_per_epoch = math.ceil(math.ceil(len(train_rows) / d.world) / cfg.batch_size)
    scheduler = _scheduler(cfg, optimizer, steps_per_epoch)
    start, best_f1, history = 0, -1.0, []
    if state is not None:
        model.load_state_dict(state["model_state"])
        criterion.load_state_dict(state["loss_state"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
            if cfg.epochs != saved.epochs:  # --resume --epochs N: stretch the schedule over the new length
                if cfg.scheduler == "onecycle":
                    raise ConfigError("--resume with another --epochs cannot stretch a onecycle schedule; "
                                      "use --scheduler cosine or none for runs you may extend")
                scheduler.T_max = max(1, cfg.epochs * steps_per_epoch)
                done = scheduler.last_epoch  # steps taken; continue as if the longer run had been planned
                for g, base in zip(optimizer.param_groups, scheduler.base_lrs):
                    g["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * (
                        1 + math.cos(math.pi * done / scheduler.T_max)) / 2
        start, best_f1, history = state["epoch"] + 1, state["best_f1"], state["history"]

    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = asdict(cfg) | {"weights_resolved": weights, "device_resolved": str(device), "world_size": d.world}
        atomic_write_bytes(out / "config.json", json.dumps(resolved, indent=2).encode())
        write_split(out / "split.csv", {person_key(r): split[person_key(r)] for r in usable})

    describe = {"model": {"name": cfg.model, "kwargs": kwargs}, "classes": L.class_names(cfg.old),
                "tasks": {t: list(n) for t, n in L.TASKS.items()} | {"age": list(L.age_names(cfg.old))},
                "img_size": cfg.img_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "preset": cfg.preset, "crop": read_meta(crops), "config": asdict(cfg)}
    label_counts = np.bincount([r["label"] for r in train_rows], minlength=L.NUM_CLASSES)
    best_val = None
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: a function of the epoch, so resume replays it
        train_ds.set_epoch(epoch)
        order = _epoch_order(cfg, epoch, train_ds, label_counts, d)
        loader = make_loader(train_ds, cfg.batch_size, cfg.workers, device, sampler=order)
        net.train()
        sums, n = {}, 0
        for step, (x, y, _) in enumerate(loader):
            x = normalize(x.to(device, non_blocking=True), channels_last=use_amp)
            y = y.to(device, non_blocking=True)
            x, y_b, lam = _mix(cfg, x, y, epoch, step, d.rank)
            with autocast(device, use_amp):
                outputs = net(x)
            loss, parts = criterion(outputs, y, y_b, lam)
            if not torch.isfinite(loss):
                kept = f"last.pt holds epoch {epoch}" if epoch > 0 else "no checkpoint was written yet"
                raise TrainingError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                                    f"training stopped ({kept}). Try a lower --lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            d.average_grads(criterion.parameters())
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            for k, v in {"loss": loss.detach(), **{f"loss_{h}": p for h, p in parts.items()}}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
            if on_step:
                on_step(step + 1, len(loader))
        train_stats = {k: d.mean(v / max(n, 1)) for k, v in sums.items()}
        val_idx, val_probs = _validate(model, val_rows, val_ds, cfg, device, d, use_amp)
        y_val = np.array([rows[i]["label"] for i in val_idx])
        pred = val_probs.argmax(1)
        m = scores(y_val, pred)
        val_loss = float(-np.log(val_probs[np.arange(len(y_val)), y_val] + 1e-12).mean())
        record = {"epoch": epoch + 1, "train_loss": train_stats["loss"],
                  **{f"train_{k}": v for k, v in train_stats.items() if k != "loss"},
                  "val_loss": val_loss, **{f"val_{k}": v for k, v in m.items()},
                  "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        if criterion.weighting == "uncertainty":
            record |= {f"weight_{h}": float(torch.exp(-criterion.log_vars[i].detach())) for i, h in enumerate(heads)}
        history.append(record)
        improved = m["f1"] > best_f1
        if improved:
            best_f1 = m["f1"]
            best_val = (val_idx, val_probs, y_val)
        if d.main:
            payload = describe | {"model_state": model.state_dict(), "epoch": epoch, "metrics": record,
                                  "best_f1": best_f1, "history": history}
            if improved:
                save_checkpoint(out / "best.pt", payload)
                _write_val_predictions(out, rows, *best_val)
            save_checkpoint(out / "last.pt", payload | {"optimizer": optimizer.state_dict(),
                                                        "scheduler": scheduler.state_dict() if scheduler else None,
                                                        "loss_state": criterion.state_dict()})
            _write_metrics(out / "metrics.csv", history)
        if on_epoch:
            on_epoch(record | {"best": improved})
    summary = {}
    if d.main:
        best = max(history, key=lambda r: r["val_f1"])
        if best_val is None:  # resumed after the best epoch: its predictions are already on disk
            best_val = _read_val_predictions(out)
        plot_confusion(out / "confusion.png", confusion(best_val[2], best_val[1].argmax(1), L.NUM_CLASSES),
                        L.class_names(cfg.old), f"validation, epoch {best['epoch']} (macro F1 {best['val_f1']:.3f})")
        summary = {"best_epoch": best["epoch"], "best": best, "last": history[-1], "epochs": len(history),
                   "train_photos": len(train_rows), "val_photos": len(val_rows),
                   "train_people": len({person_key(r) for r in train_rows}),
                   "val_people": len({person_key(r) for r in val_rows}),
                   "excluded_photos": len(rows) - len(usable), "weights": weights, "device": str(device),
                   "world_size": d.world}
        atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def _optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=cfg.lr * 0.01)
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    return None


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
    if cfg.mix == "none":
        return x, None, 1.0
    rng = np.random.default_rng([cfg.seed, epoch, step, rank])
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


def _validate(model, val_rows, val_ds, cfg, device, d: Dist, amp: bool):
    """Predictions for every validation photo: each rank infers its share, then all ranks gather all."""
    share = list(range(d.rank, len(val_rows), d.world))
    loader = make_loader(val_ds, cfg.batch_size, cfg.workers, device, sampler=share)
    idx, probs = infer(model, loader, device, tta=1, amp=amp)
    parts = d.gather((idx, probs))
    idx = np.concatenate([p[0] for p in parts])
    probs = np.concatenate([p[1] for p in parts])
    order = np.argsort(idx, kind="stable")
    return idx[order], probs[order]


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
