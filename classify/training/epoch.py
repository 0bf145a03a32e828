"""One epoch of training (`train_one_epoch`) and of validation (`validate`), for a built `Trainer`.

Gradients accumulate over --accum batches with exact means; the only host synchronisation per step
is the finite-loss check, agreed across ranks so that every rank stops at the same step.
"""
from __future__ import annotations

import contextlib
import math
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


@dataclass
class _LossGuard:
    """Stops training on a non-finite loss, the same step on every rank. Under fp16 GradScaler skips a
    step whose gradients overflow and lowers its scale, so there the run stops only after
    MAX_SKIPPED_STEPS such steps in a row."""
    scaled: bool
    in_a_row: int = 0
    skipped: int = 0

    def check(self, t, loss: torch.Tensor, epoch: int, step: int) -> bool:
        """True when the loss is finite on every rank; False for a step the scaler will skip."""
        if not t.d.any(torch.logical_not(torch.isfinite(loss.detach())).to(torch.float32)):
            self.in_a_row = 0
            return True
        kept = f"last.pt holds epoch {epoch}" if epoch > 0 else "no checkpoint was written yet"
        where = f"at epoch {epoch + 1}, step {step + 1}"
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
    guard = _LossGuard(t.scaler.is_enabled())
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


def validate_epoch(t, data, loader):
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


def _group_lr(optimizer, name: str):
    return next((g["lr"] for g in optimizer.param_groups if g.get("name") == name), "")
