"""Losses for any head (the 18-class head and each task head), and the multi-task combination.

`make_loss(name)` → fn(logits, target) → scalar:
- ce: cross entropy; smooth: cross entropy with label smoothing; focal: (1 - p_t)^gamma x CE;
- wce: cross entropy with each sample weighted by n / (K x n_class) of its class in the training set
  (the counts are given per head: `class_counts`), so a rare class weighs as much in total as a
  common one; averaged over the samples (not over their weights, as torch's `weight=` does), so a
  batch split across processes or accumulation steps gives the very loss of the whole batch;
- f1: 1 - soft macro F1 (probabilities as soft counts; only classes present in the batch's
  targets or predictions count, as in the metric).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from preprocess import labels as L

from classify.errors import ConfigError

LOSSES = ("ce", "smooth", "focal", "f1", "wce")


def class_weights(counts) -> torch.Tensor:
    """n / (K x n_k) per class, for the classes that occur (an absent class gets weight 0: it has no
    sample to weigh, and a huge weight would only matter through a mislabelled one)."""
    counts = torch.as_tensor(counts, dtype=torch.float32)
    present = counts > 0
    w = torch.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def make_loss(name: str, smoothing: float = 0.1, gamma: float = 2.0, class_counts=None):
    if name == "wce":
        if class_counts is None:
            raise ConfigError("--loss wce needs the training set's class counts")
        w = class_weights(class_counts)
        return lambda logits, y: (w.to(logits.device)[y] * F.cross_entropy(logits, y, reduction="none")).mean()
    if name == "ce":
        return lambda logits, y: F.cross_entropy(logits, y)
    if name == "smooth":
        return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=smoothing)
    if name == "focal":
        return lambda logits, y: focal_loss(logits, y, gamma)
    if name == "f1":
        return soft_f1_loss
    raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")


def focal_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)
    return (-(1 - logp.exp()) ** gamma * logp).mean()


def soft_f1_loss(logits: torch.Tensor, y: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    p = logits.softmax(-1)
    t = F.one_hot(y, logits.shape[-1]).to(p.dtype)
    tp = (p * t).sum(0)
    fp = (p * (1 - t)).sum(0)
    fn = ((1 - p) * t).sum(0)
    f1 = 2 * tp / (2 * tp + fp + fn + eps)
    present = (t.sum(0) > 0) | (p.argmax(-1)[:, None] == torch.arange(p.shape[-1], device=p.device)).any(0)
    return 1 - f1[present].mean()


def task_targets(label: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-task targets of 18-class labels (decoded by `labels.task_parts`)."""
    return {"label": label, **dict(zip(L.TASKS, L.task_parts(label)))}


class MultiTaskLoss(nn.Module):
    """Combines the loss of every head a model returns.

    weighting='fixed': sum of w_t * L_t with `weights` (default 1 each).
    weighting='uncertainty': Kendall et al. (2018): sum of exp(-s_t) * L_t + s_t with a learned
    s_t = log sigma_t^2 per head. The +s_t term grows as a weight exp(-s_t) shrinks, so no weight can
    collapse to zero: at the optimum exp(-s_t) = 1 / L_t.
    """

    def __init__(self, loss_fn, heads=("label",), weighting: str = "fixed", weights: dict | None = None):
        """`loss_fn`: one function for every head, or {head: function}."""
        super().__init__()
        if weighting not in ("fixed", "uncertainty"):
            raise ConfigError(f"unknown task weighting {weighting!r}; choose fixed or uncertainty")
        self.heads, self.weighting = tuple(heads), weighting
        self.loss_fns = loss_fn if isinstance(loss_fn, dict) else {h: loss_fn for h in self.heads}
        self.weights = {h: 1.0 for h in self.heads} | (weights or {})
        self.log_vars = nn.Parameter(torch.zeros(len(self.heads)), requires_grad=weighting == "uncertainty")

    def forward(self, outputs: dict, label: torch.Tensor, label_b: torch.Tensor | None = None, lam: float = 1.0):
        """(total, {head: loss}). With label_b and lam (mixup/cutmix), each head's loss is
        lam * L(y_a) + (1 - lam) * L(y_b)."""
        ta, tb = task_targets(label), task_targets(label_b) if label_b is not None else None
        parts, total = {}, 0.0
        for i, h in enumerate(self.heads):
            fn = self.loss_fns[h]
            loss = fn(outputs[h].float(), ta[h])
            if tb is not None:
                loss = lam * loss + (1 - lam) * fn(outputs[h].float(), tb[h])
            parts[h] = loss.detach()
            if self.weighting == "uncertainty":
                total = total + torch.exp(-self.log_vars[i]) * loss + self.log_vars[i]
            else:
                total = total + self.weights[h] * loss
        return total, parts
