"""The optimizer and its learning-rate schedule.

Every schedule is a pure function of the optimizer step (`lr_factor`), applied by one LambdaLR:
a run resumed at step s sets the factor for s and goes on, so it learns exactly as an uninterrupted
run (torch's OneCycleLR, rebuilt on resume, took its `initial_lr` = max_lr/25 for the peak and
learned 25x slower), and `--resume --epochs N` continues with the learning rates of an N-epoch plan.
"""
from __future__ import annotations

import math

import torch
from torch import nn

ONECYCLE_PCT, ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 0.3, 25.0, 1e4  # OneCycleLR's defaults
WARMUP_START = 0.01  # linear warmup starts at 1% of each group's peak


def create_optimizer(cfg, model: nn.Module, criterion: nn.Module, pretrained: bool) -> torch.optim.Optimizer:
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


def lr_factor(cfg, step: int, steps_per_epoch: int) -> float:
    """The learning rate at optimizer step `step`, as a fraction of each group's peak.

    cosine: linear warmup over --warmup epochs (at most half the run) from 1% of the peak, then a
    cosine to 0 at the plan's last step. none: the same warmup, then the peak. onecycle: OneCycleLR's
    curve (a cosine from peak/25 up to the peak over 30% of the steps, then down to peak/25e4); the
    momentum is not cycled."""
    total = max(1, cfg.epochs * steps_per_epoch)
    step = min(max(step, 0), total)
    if cfg.scheduler == "onecycle":
        up = ONECYCLE_PCT * total - 1
        low, end = 1 / ONECYCLE_DIV, 1 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV)
        if up > 0 and step <= up:
            return _cos(low, 1.0, step / up)
        down = max(total - 1 - max(up, 0), 1e-12)
        return _cos(1.0, end, min((step - max(up, 0)) / down, 1.0))
    warm = min(round(cfg.warmup * steps_per_epoch), total // 2)
    if step < warm:
        return WARMUP_START + (1 - WARMUP_START) * step / warm
    if cfg.scheduler == "cosine":
        return (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1))) / 2
    return 1.0


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


def create_scheduler(cfg, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                     step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of `cfg`, positioned at optimizer step `step` (0 for a new run; a resumed run's
    steps so far). Each group's peak is its learning rate as `create_optimizer` set it."""
    peaks = [g.get("peak_lr", g["lr"]) for g in optimizer.param_groups]
    for g, peak in zip(optimizer.param_groups, peaks):
        g["peak_lr"] = g["initial_lr"] = peak
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, steps_per_epoch),
                                              last_epoch=step - 1)
    if step:  # LambdaLR positioned at last_epoch >= 0 does not apply the factor itself
        for g, peak in zip(optimizer.param_groups, peaks):
            g["lr"] = peak * lr_factor(cfg, step, steps_per_epoch)
        sched._last_lr = [g["lr"] for g in optimizer.param_groups]
    return sched
