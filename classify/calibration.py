"""Calibrated probabilities: temperature scaling, fitted on validation predictions, and the expected
calibration error (ECE) that says whether a probability of 0.9 is right nine times in ten.

A model's probabilities p (after TTA averaging) are calibrated as softmax(log p / T): T > 1 softens an
over-confident model, T < 1 sharpens an under-confident one, and the top class never changes. T is
fitted after training on the best epoch's validation predictions (a k-fold run: on the out-of-fold
predictions) by minimising their negative log-likelihood, stored in the checkpoint (`temperature`), and
applied by predict, evaluate, pseudo-label (`--no-calibrate` skips it). Numpy only.
"""
from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15
T_RANGE = (0.05, 20.0)


def apply_temperature(probs: np.ndarray, t: float) -> np.ndarray:
    """softmax(log p / t) row-wise; t = 1 returns the probabilities (renormalised)."""
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)) / t
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(probs: np.ndarray, y: np.ndarray, t: float) -> float:
    p = apply_temperature(probs, t)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)).mean())


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The T in T_RANGE minimising the validation NLL (golden-section search over log T; the NLL is
    convex in 1/T). 1.0 when there is nothing to fit."""
    y = np.asarray(y, dtype=int)
    if len(y) == 0:
        return 1.0
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(probs, y, math.exp(a)), nll(probs, y, math.exp(b))
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(probs, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(probs, y, math.exp(b))
    t = math.exp((lo + hi) / 2)
    return t if nll(probs, y, t) < nll(probs, y, 1.0) else 1.0


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin (top-class probability in [k/bins, (k+1)/bins)): photos, mean confidence, accuracy."""
    probs, y = np.asarray(probs), np.asarray(y, dtype=int)
    conf, pred = probs.max(1), probs.argmax(1)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    out = []
    for k in range(bins):
        m = which == k
        out.append({"bin": k, "from": k / bins, "to": (k + 1) / bins, "photos": int(m.sum()),
                    "confidence": float(conf[m].mean()) if m.any() else None,
                    "accuracy": float((pred[m] == y[m]).mean()) if m.any() else None})
    return out


def ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the photo-weighted mean |accuracy - confidence| over the bins."""
    n = len(y)
    if n == 0:
        return 0.0
    return float(sum(b["photos"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in reliability(probs, y, bins) if b["photos"]))


def calibrate(probs: np.ndarray, y: np.ndarray) -> dict:
    """{'temperature', 'ece_before', 'ece_after', 'nll_before', 'nll_after'} of validation predictions."""
    t = fit_temperature(probs, y)
    return {"temperature": t, "ece_before": ece(probs, y), "ece_after": ece(apply_temperature(probs, t), y),
            "nll_before": nll(probs, y, 1.0), "nll_after": nll(probs, y, t), "bins": ECE_BINS, "photos": int(len(y))}
