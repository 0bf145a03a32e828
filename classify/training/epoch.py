"""One epoch of training (`train_one_epoch`) and of validation (`validate`), for a built `Trainer`.

Gradients accumulate over --accum batches with exact means; the only host synchronisation per step
is the finite-loss check, agreed across ranks so that every rank stops at the same step.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from classify.inference.calibration import nll
from classify.inference.engine import autocast, infer
from classify.errors import TrainingError
from classify.metrics import scores
from classify.training.mixing import mix_batch
from classify.data.transforms import normalize

MAX_SKIPPED_STEPS = 10  # fp16: non-finite losses in a row that GradScaler may skip before the run stops
# Divergence: a step's loss above DIVERGE_FACTOR x the run's first step's loss stops the run. Chosen by
# measurement (BENCHMARKS §17, bench/divergence.py; 70 runs, every --loss, with and without cutmix, lr
# 1e-4..1e6): runs at lr <= 0.01 peaked at 1.48x their first step, runs at lr 0.1 (which learned nothing, but
# stayed finite) at 5.92x; every run at lr >= 1 passed 17.9x by its third step (lr 1e6: 1e18 at its second).
# 10x stops all of those at step 2 or 3 and leaves healthy runs a margin of 6.7. The bounded f1 loss never
# grows; its divergence shows as non-finite logits, which stop it as well.
DIVERGE_FACTOR = 10.0


@dataclass
class _LossGuard:
    """Stops training on a non-finite loss, or one that has grown DIVERGE_FACTOR times beyond the run's
    first step's (`first`: [that loss] once known, shared with the trainer across epochs and kept in
    last.pt), the same step on every rank. Under fp16 GradScaler skips a step whose gradients overflow and
    lowers its scale, so there a non-finite loss stops the run only after MAX_SKIPPED_STEPS such steps in a row."""
    scaled: bool
    first: list
    in_a_row: int = 0
    skipped: int = 0

    @property
    def limit(self) -> float:
        return DIVERGE_FACTOR * self.first[0] if self.first else math.inf

    def check(self, t, loss: torch.Tensor, epoch: int, step: int) -> bool:
        """True when the loss is finite on every rank; False for a step the scaler will skip."""
        kept = f"last.pt holds epoch {epoch}" if epoch > 0 else "no checkpoint was written yet"
        where = f"at epoch {epoch + 1}, step {step + 1}"
        loss = loss.detach()
        limit = self.limit
        if not self.first:
            value = loss.item()  # one host sync, until the run's first finite loss is known
            if math.isfinite(value):
                self.first.append(value)
        grown = (torch.isfinite(loss) & (loss > limit)).to(torch.float32) * 2 if math.isfinite(limit) else \
            torch.zeros((), device=loss.device)
        flag = t.d.max(torch.maximum(torch.logical_not(torch.isfinite(loss)).to(torch.float32), grown))
        if flag == 0:
            self.in_a_row = 0
            return True
        if flag >= 2:
            raise TrainingError(f"training diverged {where}: the loss grew to {loss.item():.3g}, over "
                                f"{DIVERGE_FACTOR:g} times its first step's {self.first[0]:.3g} (on this or "
                                f"another process); training stopped ({kept}). Try a lower --lr.")
        if self.scaled:
            self.in_a_row += 1
            self.skipped += 1
            if self.in_a_row < MAX_SKIPPED_STEPS:
                return False
            raise TrainingError(f"the loss was non-finite for {self.in_a_row} steps in a row under fp16 (GradScaler "
                                f"skipped each and lowered its scale to {t.scaler.get_scale():g}), last {where}; training "
                                f"stopped ({kept}). Try --amp off or bf16, or a lower --lr.")
        what = f"the loss became {loss.item()}" if not math.isfinite(loss.item()) else \
            "the loss became non-finite in another process"
        raise TrainingError(f"{what} {where}; training stopped ({kept}; no fp16 gradient scaler to skip the step). "
                            "Try a lower --lr.")


def train_one_epoch(t, loader, epoch: int, on_step=None) -> dict:
    """One pass over the loader; returns the mean loss per head (and, under fp16, the steps skipped).
    Gradients accumulate over --accum batches; the only host synchronisation per step is the
    finite-loss check, agreed across ranks."""
    cfg, d, device = t.cfg, t.d, t.d.device
    t.net.train()
    sums, n, total, items = {}, 0, len(loader), len(loader.sampler)
    guard = _LossGuard(t.scaler.is_enabled(), t.first_losses)
    params = [p for g in t.optimizer.param_groups for p in g["params"]]
    for step, (x, y, _) in enumerate(loader):
        group_end = min((step // cfg.accum + 1) * cfg.accum, total)
        first = (step // cfg.accum) * cfg.accum * cfg.batch_size
        share = x.shape[0] / min(cfg.accum * cfg.batch_size, items - first)  # of the group's samples: exact means
        x = normalize(x.to(device, non_blocking=True), t.norm["mean"], t.norm["std"], channels_last=device.type == "cuda")
        y = y.to(device, non_blocking=True)
        x, y_b, lam = mix_batch(cfg, x, y, epoch, step, d.rank)
        sync = d.world == 1 or step + 1 == group_end
        with (contextlib.nullcontext() if sync else t.net.no_sync()):
            with autocast(device, t.amp):
                outputs = t.net(x)
            loss, parts = t.criterion(outputs, y, y_b, lam)
            finite = guard.check(t, loss, epoch, step)
            t.scaler.scale(loss * share).backward()  # a skipped step's inf gradients make the scaler skip it
        if step + 1 == group_end:
            _optimizer_step(t, params)
        if finite:
            for k, v in {"loss": loss.detach(), **{f"loss_{h}": p for h, p in parts.items()}}.items():
                sums[k] = sums.get(k, 0.0) + v  # device tensors: summed without a host sync
            n += 1
        if on_step:
            on_step(step + 1, total)
    stats = {k: d.mean(float(v) / max(n, 1)) for k, v in sums.items()}
    if guard.scaled:
        stats["skipped_steps"] = guard.skipped
    return stats


def _optimizer_step(t, params) -> None:
    t.d.average_grads(t.criterion.parameters())
    if t.cfg.clip_grad:
        t.scaler.unscale_(t.optimizer)
        nn.utils.clip_grad_norm_(params, t.cfg.clip_grad)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    if t.scaler.is_enabled():  # GradScaler may have skipped this step (an fp16 overflow, counted in skipped_steps):
        with warnings.catch_warnings():  # torch then warns that the schedule stepped first; it moves per step by design
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            t.scheduler.step()
    else:
        t.scheduler.step()
    if t.ema is not None:
        t.ema.update_parameters(t.model)


def validate(model, data, loader, t):
    """(manifest indices, logits N x 18, labels at --val-old, metrics) of every validation photo:
    each rank infers its share, then all ranks gather all."""
    idx, logits = infer(model, loader, t.d.device, tta=1, amp=t.amp, mean=t.norm["mean"], std=t.norm["std"])
    parts = t.d.gather((idx, logits[0]))
    idx = np.concatenate([p[0] for p in parts])
    logits = np.concatenate([p[1] for p in parts])
    order = np.argsort(idx, kind="stable")
    idx, logits = idx[order], logits[order]
    pos = {r["index"]: k for k, r in enumerate(data.val_rows)}
    y = data.val_labels[[pos[i] for i in idx]]
    m = scores(y, logits.argmax(1))
    m["loss"] = nll(logits, y, 1.0) if len(y) else 0.0
    return idx, logits, y, m


def validate_epoch(t, data, loader, epoch: int = 0):
    """Validate the model (and its EMA, keeping whichever scores the better macro F1): (validation
    result, 'model' | 'ema', the epoch's record of validation metrics and learning rates)."""
    val, source, extra = validate(t.model, data, loader, t), "model", {}
    if t.ema is not None:
        ema_val = validate(t.ema.module, data, loader, t)
        extra = {"model_val_f1": val[3]["f1"], "ema_val_f1": ema_val[3]["f1"]}
        if ema_val[3]["f1"] > val[3]["f1"]:
            val, source = ema_val, "ema"
    m = dict(val[3])
    _finite_validation(val[1], m["loss"], epoch)
    record = {"val_loss": m.pop("loss"), **{f"val_{k}": v for k, v in m.items()}, **extra,
              "lr": t.optimizer.param_groups[0]["lr"], "lr_backbone": _group_lr(t.optimizer, "backbone")}
    if t.ema is not None:
        record["weights_from"] = source
    if t.criterion.weighting == "uncertainty":
        record |= {f"weight_{h}": float(torch.exp(-t.criterion.log_vars[i].detach()))
                   for i, h in enumerate(t.criterion.heads)}
    return val, source, record


def _finite_validation(logits: np.ndarray, loss: float, epoch: int) -> None:
    """A model whose validation logits or loss are not finite has diverged, whatever its training loss
    said: the run stops before such an epoch is saved (no best.pt from it)."""
    bad = int((~np.isfinite(logits)).any(axis=1).sum()) if len(logits) else 0
    if bad or not math.isfinite(loss):
        what = f"{bad} of {len(logits)} validation photos got non-finite logits" if bad else \
            f"the validation loss is {loss}"
        kept = f"last.pt holds epoch {epoch}" if epoch > 0 else "no checkpoint was written yet"
        raise TrainingError(f"training diverged at epoch {epoch + 1}: {what}; training stopped ({kept}, nothing "
                            "of this epoch saved). Try a lower --lr.")


def _group_lr(optimizer, name: str):
    return next((g["lr"] for g in optimizer.param_groups if g.get("name") == name), "")
