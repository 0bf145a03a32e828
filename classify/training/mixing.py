"""The order of an epoch's samples and the mixing of a batch (CutMix, MixUp, vcutmix).

Both are functions of (seed, epoch[, step, rank]) only, so a resumed run and any number of workers
or processes draw what an uninterrupted single process draws.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from preprocess import labels as L


def epoch_order(cfg, epoch: int, ds, label_counts, d) -> list[int]:
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


def mix_batch(cfg, x, y, epoch: int, step: int, rank: int):
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
