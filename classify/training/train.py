"""Training: `fit(TrainConfig)` reads only the manifest and writes a self-describing run folder
(see rundir.py for its files; k-fold runs: kfold.py).

The run is made of named steps, each a small function: `prepare_data` (data.py: rows, person split,
labels at --old and --val-old, --extra folders), `build_model`, `create_criterion`, `create_optimizer`
and `create_scheduler` (schedule.py), `train_one_epoch`, `validate`, and the checkpointing in
`_save_epoch`.

Every random draw is derived from (seed, epoch[, step]): batch order, augmentation (per sample),
mixing, dropout; the learning rate is a function of the optimizer step. A run is deterministic on
the CPU for a seed, and a resumed run replays exactly the epochs it had not finished. Under torchrun
rank 0 resolves the weights and tells the others; each rank trains on its share of every global
batch with DistributedDataParallel (which starts every replica from rank 0's weights); validation
predictions are gathered so every rank sees the true metrics; only rank 0 writes. An error on any
rank ends that rank at once (no wait on its peers), and torchrun then ends the job.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from preprocess import labels as L
from preprocess.manifest import read_meta

from classify.inference import rundir
from classify.training import runs
from classify.inference.card import card_of, new_card
from classify.models import weights as W
from classify.inference.calibration import apply_temperature, calibrate as calibrate_logits
from classify.checkpoint import load_checkpoint, save_checkpoint
from classify.training.config import TrainConfig, changed_keys, config_from
from classify.data.dataset import (CropDataset, Data, expected_class_counts, people_of, person_key, prepare_data,
                                   validation_caution)
from classify.training.distributed import Dist, init_distributed
from classify.inference.engine import EpochOrder, default_workers, make_loader, resolve_amp
from classify.training.epoch import train_one_epoch, validate_epoch
from classify.training.kfold import fit_folds, learned_record
from classify.errors import ConfigError
from classify.training.losses import MultiTaskLoss, make_loss
from classify.metrics import confusion
from classify.training.mixing import epoch_order
from classify.models.nets import create_model, freeze_backbone, model_arch, model_kwargs, output_heads
from classify.plots import plot_confusion
from classify.training.schedule import create_optimizer, create_scheduler
from classify.training.tblog import RunLog
from classify.data.transforms import build_transform

def fit(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
        on_epoch: Callable[[dict], None] | None = None, on_step: Callable[[int, int], None] | None = None,
        warn: Callable[[str], None] = print) -> dict:
    """Train per `cfg`; returns the summary (also written to RUN/summary.json).

    A folder that already holds a run is refused unless `resume` (continue it) or `overwrite`. An
    overwrite trains into a fresh folder beside it (`rundir.staging`) and swaps the two at the end: nothing
    of the old run (fold folders, events, summaries) is read, and a killed overwrite leaves the old run.

    >>> fit(TrainConfig(crops="/tmp/c", out="/tmp/r", model="mobilenet_v2", weights="imagenet", epochs=6))
    >>> fit(TrainConfig(crops="/tmp/c", out="/tmp/r5", folds=5, fold="all"))   # RUN/fold0..4 + out-of-fold score
    """
    d = init_distributed(cfg.device)
    final = Path(cfg.out)
    warn = once_each(warn)  # a k-fold run's folds share their notes: each is said once for the run
    try:
        if d.main:
            done = rundir.recover_swap(final)
            if done:
                warn(done)
        found = rundir.existing_run(final) if not resume else []
        if not resume:
            _refuse_foreign_out(final, Path(cfg.crops), overwrite and bool(found))
        if found and not overwrite:
            raise ConfigError(f"{cfg.out} already holds a run ({', '.join(found)}): add --resume to continue "
                              "it, --overwrite to replace it, or choose another --out")
        if found:  # --overwrite: a fresh run beside the old one, swapped in when it is whole
            cfg = dataclasses.replace(cfg, out=str(rundir.staging(final)))
            if d.main:
                rundir.clear(Path(cfg.out))  # what a killed overwrite left
        d.barrier()  # every rank has looked before rank 0 writes
        if cfg.fold == "all":
            summary = fit_folds(cfg, d, resume, on_epoch, on_step, warn, fit_one)
        else:
            summary = fit_one(cfg, d, resume, on_epoch, on_step, warn)
        if found:
            d.barrier()
            if d.main:
                runs.swap_in(Path(cfg.out), final)
    except BaseException:
        d.abort()  # no goodbye to the other ranks: they may be waiting for this one in a collective
        raise
    d.close()
    return summary


def _refuse_foreign_out(out: Path, crops: Path, replacing: bool) -> None:
    """A run is written into a folder of its own: never into the crops it trains on or a folder above them, and
    never among files no run writes, which a later --overwrite would delete with the run (it did: a user's
    folder given as --out, and a crops folder given as its own --out, were deleted by the swap)."""
    import os

    if not (crops / "manifest.csv").is_file():
        return  # no crops at all: that error comes first (from prepare_data), before anything is written
    where, data = Path(os.path.realpath(out)), Path(os.path.realpath(crops))
    if where == data or where in data.parents:
        raise ConfigError(f"--out {out} {'is' if where == data else 'holds'} the crops folder this run trains on "
                          f"({crops}): give the run a folder of its own (e.g. {data.parent / 'runs' / 'r1'})")
    foreign = rundir.foreign_entries(out)
    if foreign:
        names = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        if replacing:
            raise ConfigError(f"{out} holds {names} beside its run: --overwrite replaces the whole folder and would "
                              "delete them; move them out first, or choose another --out")
        raise ConfigError(f"{out} holds {names}, which no run writes: train into a new or empty folder (a later "
                          "--overwrite replaces the whole run folder, and would delete them)")


# -- one run ----------------------------------------------------------------------------------------------

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
    steps_per_epoch: int
    first_losses: list = dataclasses.field(default_factory=list)  # the divergence check's reference (epoch.py)


@dataclass
class Progress:
    """Where a run stands: the next epoch, the best validation F1 and its epoch, the history."""
    start: int = 0
    best_f1: float = -1.0
    best_epoch: int = 0
    history: list = None
    best_val: tuple | None = None   # the best epoch's (indices, logits, labels), when this process saw it
    stopped_early: bool = False


def fit_one(cfg: TrainConfig, d: Dist, resume: bool, on_epoch, on_step, warn, calibrate: bool = True,
            in_folds: bool = False) -> dict:
    """Train one run (one fold of a k-fold run: `in_folds`) into cfg.out. `calibrate`: fit the temperature
    on this run's validation predictions (a k-fold run fits one on the out-of-fold predictions instead)."""
    out = Path(cfg.out)
    state = _resume_state(cfg, out) if resume else None
    data = prepare_data(cfg)
    caution = None if in_folds else validation_caution(data, False)  # k-fold: said of the out-of-fold score
    if caution:
        data.warnings.append(caution)
    if resume and (out / rundir.SPLIT).is_file():
        _same_validation(out, data.split)
    weights, note = _resolve_weights(cfg, d, state)
    if note and d.main and state is None:
        warn(note)
    t, kwargs = build_trainer(cfg, d, data, weights, state)
    if cfg.amp in ("bf16", "fp16") and t.amp == "off":  # asked for by name: say it is not what runs
        data.warnings.append(f"--amp {cfg.amp} on {t.d.device.type}: mixed precision runs on CUDA only, so this run "
                             "trains in fp32 (config.json's amp_resolved says off)")
    progress = _restore(t, state) if state is not None else Progress(history=[])
    workers = cfg.workers if cfg.workers is not None else default_workers(d.world)
    if d.main:
        _write_start(out, cfg, data, t, weights, workers)
    for w in data.warnings:  # once the run has started: a refused option or folder is the one line a user sees
        warn(w)
    describe = {"card": new_card(cfg, kwargs, t.norm, weights, note, read_meta(Path(cfg.crops))).to_dict(),
                "config": asdict(cfg)}
    interp = t.norm["interpolation"]
    train_ds = CropDataset(cfg.crops, data.train_rows, build_transform(cfg.preset, cfg.img_size, True, interp), cfg.seed,
                           cfg.synth_mask)
    val_ds = CropDataset(cfg.crops, data.val_rows, build_transform(cfg.preset, cfg.img_size, False, interp), cfg.seed)
    log = RunLog(out, enabled=d.main)
    if log.note:
        _warn_once(warn, log.note)
    if progress.start == 0 and log.writer is not None:
        first = list(range(min(8, len(val_ds))))
        log.crops(np.stack([val_ds[i][0].numpy() for i in first]) if first else np.zeros(0),
                  [L.class_names(cfg.val_old)[int(data.val_labels[i])] for i in first])
    if _should_stop(cfg, progress):
        progress.stopped_early = True  # resumed after it stopped early: nothing more to train
    else:
        _train_epochs(t, data, train_ds, val_ds, workers, progress, describe, log, on_epoch, on_step)
    log.close()
    return _finish(out, cfg, data, progress, weights, note, d, calibrate and cfg.calibrate) if d.main else {}


def _same_validation(out: Path, split: dict[str, str]) -> None:
    """A resumed run validates on the people it started with (a run split by an older maskcls may not)."""
    saved = {p for p, s in rundir.read_split(out).items() if s == "val"}
    now = {p for p, s in split.items() if s == "val"}
    if saved != now:
        raise ConfigError(f"--resume: {out}/{rundir.SPLIT} names other validation people than this maskcls draws for "
                          f"its seed ({len(saved ^ now)} differ; the split was made by an older version): finish it "
                          "with the version that started it, or train it again with --overwrite")


def _should_stop(cfg: TrainConfig, p: Progress) -> bool:
    """Early stopping: --patience epochs without a better validation F1 (never at the plan's last epoch)."""
    return bool(cfg.patience) and p.start > 0 and p.start - p.best_epoch >= cfg.patience and p.start < cfg.epochs


def _train_epochs(t: Trainer, data: Data, train_ds, val_ds, workers, p: Progress, describe, log, on_epoch, on_step):
    cfg, d = t.cfg, t.d
    order = EpochOrder()
    loader = make_loader(train_ds, cfg.batch_size, workers, d.device, sampler=order, persistent=True)
    val_loader = make_loader(val_ds, cfg.batch_size, workers, d.device,
                             sampler=list(range(d.rank, len(data.val_rows), d.world)), persistent=True)
    label_counts = np.bincount([r["label"] for r in data.train_rows], minlength=L.NUM_CLASSES)
    for epoch in range(p.start, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: a function of the epoch, so resume replays it
        order.set(epoch_order(cfg, epoch, train_ds, label_counts, d), epoch)
        train_stats = train_one_epoch(t, loader, epoch, on_step)
        val, source, record = validate_epoch(t, data, val_loader, epoch)
        record = {"epoch": epoch + 1, "train_loss": train_stats["loss"],
                  **{f"train_{k}": v for k, v in train_stats.items() if k != "loss"}, **record,
                  "seconds": time.perf_counter() - t0}
        p.history.append(record)
        log.epoch(record)
        improved = record["val_f1"] > p.best_f1
        if improved:
            p.best_f1, p.best_epoch, p.best_val = record["val_f1"], epoch + 1, val[:3]
        p.start = epoch + 1
        p.stopped_early = _should_stop(cfg, p)
        if d.main:
            best_state = (t.ema.module if source == "ema" else t.model).state_dict()
            _save_epoch(Path(cfg.out), t, describe, p, record, improved, best_state, data.rows, val[:3])
        if on_epoch:
            on_epoch(record | {"best": improved})
        if p.stopped_early:
            break


def _resume_state(cfg: TrainConfig, out: Path) -> dict | None:
    """last.pt of the run to continue (None: stopped before its first epoch ended, so it starts over),
    refused if `cfg` differs from its config beyond what --resume may change."""
    if not (out / rundir.LAST).is_file():
        return None
    state = load_checkpoint(out / rundir.LAST)
    changed = changed_keys(cfg, config_from(state["config"]))
    if changed:
        raise ConfigError(f"--resume continues {out} as it was configured; these differ from its config: "
                          f"{', '.join(changed)} (build the config with resume_config)")
    return state


def _resolve_weights(cfg: TrainConfig, d: Dist, state: dict | None) -> tuple[str, str | None]:
    """(weights, warning): what the run starts from (a resumed run: what it started from). Under torchrun
    rank 0 alone resolves (and downloads) and tells the others, so every replica starts from the same
    weights and learning rates whatever each node's cache holds; its error ends every rank alike."""
    if state is not None:
        prov = card_of(state).provenance
        return prov.get("weights") or "none", prov.get("weights_note")
    answer = None
    if d.main:
        try:
            answer = ("ok", W.resolve(cfg.weights, model_arch(cfg.model, model_kwargs(cfg.model, cfg.backbone))))
        except ConfigError as e:
            answer = ("error", str(e))
    answer = d.broadcast(answer)
    if answer[0] == "error":
        raise ConfigError(answer[1])
    return tuple(answer[1])


def build_model(cfg: TrainConfig, weights: str, load: bool = True) -> tuple[nn.Module, dict, dict]:
    """(model, its constructor kwargs, its input normalisation {mean, std, interpolation} for `weights`).
    `load`: load the weights' tensors (not where they come from elsewhere: a resumed run's checkpoint,
    or under torchrun rank 0, whose weights DDP copies to every rank). The model is checked to take
    --img-size before any training."""
    kwargs = model_kwargs(cfg.model, cfg.backbone if cfg.model == "attention" else None, cfg.dropout)
    model = create_model(cfg.model, weights=weights if load else "none", **kwargs)
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


def create_criterion(cfg: TrainConfig, model: nn.Module, class_counts: np.ndarray) -> MultiTaskLoss:
    """One loss per head the model returns (the 18 classes; the attention model also each task),
    combined by --task-weighting. --loss wce weighs each head's classes by their training counts
    (`class_counts`, per class: as training sees them, --synth-mask included)."""
    heads = output_heads(model)
    counts = {"label": np.asarray(class_counts, dtype=float)}
    for task, part in zip(L.TASKS, L.task_parts(np.arange(L.NUM_CLASSES))):
        counts[task] = np.bincount(part, weights=counts["label"], minlength=len(L.TASKS[task]))
    fns = {h: make_loss(cfg.loss, cfg.smoothing, cfg.gamma, counts[h]) for h in heads}
    return MultiTaskLoss(fns, heads, cfg.task_weighting if len(heads) > 1 else "fixed")


def build_trainer(cfg: TrainConfig, d: Dist, data: Data, weights: str, state: dict | None = None) -> tuple[Trainer, dict]:
    """(the trainer, the model's constructor kwargs): the model on its device (channels_last,
    cudnn.benchmark on CUDA; DDP under torchrun; compiled if asked), its loss, optimizer, schedule,
    gradient scaler and EMA. A resumed run (`state`) keeps its checkpoint's normalisation."""
    device = d.device
    torch.manual_seed(cfg.seed)
    model, kwargs, norm = build_model(cfg, weights, load=state is None and d.main)
    if state is not None:
        norm = card_of(state).norm
    criterion = create_criterion(cfg, model, expected_class_counts(data.train_rows, cfg.synth_mask))
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
        # DDP broadcasts rank 0's parameters and buffers: every replica starts from rank 0's weights.
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
                torch.amp.GradScaler(device.type, enabled=amp == "fp16"), ema, amp, norm, steps_per_epoch)
    return t, kwargs


def _restore(t: Trainer, state: dict) -> Progress:
    """Load last.pt into the trainer; the schedule is set to the step reached, for this config's plan
    (so `--resume --epochs N` continues as if N epochs had been planned from the start)."""
    t.model.load_state_dict(state["model_state"])
    # the divergence check's reference is the run's first step, not this process's (a run saved before it
    # was recorded: its first epoch's mean training loss stands in)
    first = state.get("first_losses") or [float(r["train_loss"]) for r in state["history"][:1]]
    t.first_losses[:] = [v for v in first if math.isfinite(v)]
    t.criterion.load_state_dict(state["loss_state"])
    peaks = [g["peak_lr"] for g in t.optimizer.param_groups]
    t.optimizer.load_state_dict(state["optimizer"])
    for g, peak in zip(t.optimizer.param_groups, peaks):
        g["peak_lr"] = peak  # this config's peaks, whatever the saved groups say
    if state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    if t.ema is not None and state.get("ema_state"):
        t.ema.load_state_dict(state["ema_state"])
    start = state["epoch"] + 1
    t.scheduler = create_scheduler(t.cfg, t.optimizer, t.steps_per_epoch, step=start * t.steps_per_epoch)
    history = state["history"]
    best_epoch = rundir.best_record(history)["epoch"] if history else 0
    return Progress(start, state["best_f1"], best_epoch, history, None, bool(state.get("stopped_early")))


def _write_start(out: Path, cfg: TrainConfig, data: Data, t: Trainer, weights: str, workers: int) -> None:
    """config.json (the resolved config) and split.csv (people left out by --drop-ages-near: 'dropped')."""
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_config(out, asdict(cfg) | {
        "weights_resolved": weights, "device_resolved": str(t.d.device), "world_size": t.d.world,
        "workers_resolved": workers, "amp_resolved": t.amp, "normalisation": t.norm})
    kept = {person_key(r) for r in data.train_rows}
    extra = {person_key(r): "extra" for r in data.train_rows[len(data.train_rows) - data.extra:]} if data.extra else {}
    rundir.write_split(out / rundir.SPLIT, {p: "dropped" if s == "train" and p not in kept else s
                                            for p, s in data.split.items()} | extra)


_WARNED: set[str] = set()


def once_each(warn, already=()):
    """`warn` that says each message once (and never those in `already`): one run's folds, one study's trials."""
    said = set(already)

    def once(message: str) -> None:
        if message not in said:
            said.add(message)
            warn(message)
    return once


def _warn_once(warn, message: str) -> None:
    """A note that holds for the whole process (every fold of a k-fold run), said once."""
    if message not in _WARNED:
        _WARNED.add(message)
        warn(message)


def _save_epoch(out: Path, t: Trainer, describe: dict, p: Progress, record: dict, improved: bool, best_state,
                rows, val) -> None:
    """best.pt (and the best epoch's validation predictions) when the epoch improved; last.pt, the
    last epoch's validation predictions and metrics.csv every epoch."""
    epoch = record["epoch"] - 1
    payload = describe | {"epoch": epoch, "metrics": record, "best_f1": p.best_f1, "best_epoch": p.best_epoch,
                          "history": p.history, "steps_done": (epoch + 1) * t.steps_per_epoch,
                          "first_losses": list(t.first_losses)}
    ids = [rows[i]["image_id"] for i in val[0]]
    probs = apply_temperature(val[1])
    if improved:
        save_checkpoint(out / rundir.BEST, payload | {"model_state": best_state})
        rundir.write_val_predictions(out / rundir.VAL_PREDICTIONS, ids, probs, val[2])
        rundir.write_val_logits(out / rundir.VAL_LOGITS, ids, val[1], val[2])
    rundir.write_val_predictions(out / rundir.VAL_PREDICTIONS_LAST, ids, probs, val[2])
    save_checkpoint(out / rundir.LAST, payload | {
        "model_state": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
        "scaler": t.scaler.state_dict(), "loss_state": t.criterion.state_dict(),
        "ema_state": t.ema.state_dict() if t.ema is not None else None, "stopped_early": p.stopped_early})
    rundir.write_metrics(out, p.history)


def _finish(out: Path, cfg: TrainConfig, data: Data, p: Progress, weights, note, d: Dist, calibrate: bool) -> dict:
    best = rundir.best_record(p.history)
    if p.best_val is None:  # resumed after the best epoch: its logits are already on disk
        ids, logits, y = rundir.read_val_logits(out)
    else:
        idx, logits, y = p.best_val
        ids = [data.rows[i]["image_id"] for i in idx]
    plot_confusion(out / "confusion.png", confusion(y, logits.argmax(1), L.NUM_CLASSES),
                   L.class_names(cfg.val_old), f"validation, epoch {best['epoch']} (macro F1 {best['val_f1']:.3f})")
    summary = {"best_epoch": best["epoch"], "best": best, "last": p.history[-1], "epochs": len(p.history),
               "stopped_early": p.stopped_early, "train_photos": len(data.train_rows), "val_photos": len(data.val_rows),
               "extra_photos": data.extra,
               "train_people": people_of(data.train_rows), "val_people": people_of(data.val_rows),
               "excluded_photos": len(data.rows) - (len(data.train_rows) - data.extra) - len(data.val_rows)
               - data.dropped_near_boundary,
               "dropped_near_boundary": data.dropped_near_boundary, "val_old": cfg.val_old,
               **({"label_fixes": data.label_fixes} if data.label_fixes else {}),
               **({"groups": data.groups} if data.groups else {}),
               "weights": weights, "warnings": ([note] if note else []) + data.warnings, "device": str(d.device),
               "world_size": d.world}
    if calibrate:
        summary["calibration"] = calibrate_logits(logits, y, people=people_of(data.val_rows))
    person = {r["image_id"]: person_key(r) for r in data.rows}
    # a k-fold run's folds get the out-of-fold record after (kfold.write_out_of_fold)
    summary["validation"] = learned_record(y, logits.argmax(1), [person[i] for i in ids], "validation")
    runs.update_card(out, summary.get("calibration"), summary["validation"])
    rundir.write_summary(out, summary)
    return summary
