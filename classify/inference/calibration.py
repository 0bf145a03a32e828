"""Calibrated probabilities: temperature scaling, fitted on validation predictions, and the expected
calibration error (ECE) that says whether a probability of 0.9 is right nine times in ten.

A model's logits z are calibrated as softmax(z / T), in float64 (with TTA: softmax(log p / T) of the views'
mean probability, `answer.model_probs`): T > 1 softens an over-confident model, T < 1 sharpens an
under-confident one, and the top class never changes. T is fitted after training on the best epoch's validation
logits (a k-fold run: the out-of-fold logits, read from each fold's binary val_logits.npz, never from a
rounded CSV) by minimising their negative log-likelihood, in the very form it is applied: the torch and
the ONNX path both hand logits to `answer`, so their probabilities agree. T is stored in the model card's
`calibration` (card.py; best.pt and the ONNX metadata carry the card) and applied by predict, evaluate,
pseudo-label and serve (`--no-calibrate` skips it).
A fit that lands on the edge of T_RANGE, or that makes the ECE worse, is not trusted: T stays 1 and the
calibration record says why (`kept`). Numpy only.
"""
from __future__ import annotations

import math

import numpy as np

from classify.errors import CheckpointError
from classify.metrics import few_people


def check_finite(values: np.ndarray, what: str = "logits") -> None:
    """Non-finite logits or probabilities (a diverged model) are refused: a temperature or an ECE of them
    would be a number that means nothing (an ECE of NaN rows printed 0.0000)."""
    bad = ~np.isfinite(np.asarray(values, dtype=np.float64))
    if bad.any():
        rows = int(bad.reshape(len(bad), -1).any(axis=1).sum()) if bad.ndim > 1 else int(bad.sum())
        raise CheckpointError(f"the model's {what} are not finite for {rows} of {len(bad)} photos (it diverged in "
                              "training): no calibration or ECE can be made of them; train again with a lower --lr")

ECE_BINS = 15
T_RANGE = (0.05, 20.0)


def apply_temperature(logits: np.ndarray, t: float = 1.0) -> np.ndarray:
    """softmax(z / t) over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64) / t
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / t
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    """The mean negative log-likelihood of labels `y` under softmax(logits / t) (exact: no clipping)."""
    return float(-log_softmax(logits, t)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T in T_RANGE minimising the validation NLL (golden-section search over log T; the NLL is
    convex in 1/T). 1.0 when there is nothing to fit."""
    y = np.asarray(y, dtype=int)
    if len(y) == 0:
        return 1.0
    check_finite(logits)
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(logits, y, math.exp(a)), nll(logits, y, math.exp(b))
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(logits, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(logits, y, math.exp(b))
    t = math.exp((lo + hi) / 2)
    return t if nll(logits, y, t) < nll(logits, y, 1.0) else 1.0


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
    check_finite(probs, "probabilities")
    return float(sum(b["photos"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in reliability(probs, y, bins) if b["photos"]))


def calibrate(logits: np.ndarray, y: np.ndarray, fitted_on: str = "validation logits",
              people: int | None = None) -> dict:
    """{'temperature', 'fitted', 'ece_before', 'ece_after', 'nll_before', 'nll_after', ...} of validation
    logits N x 18. `fitted` is the NLL minimiser; `temperature` is what predict applies: `fitted`, or 1
    when the fit is not to be trusted (on an edge of T_RANGE: too few or too easy photos; or a worse ECE),
    with the reason in `kept`. `people`: how many people the photos show; too few gives a `caution`."""
    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y, dtype=int)
    fitted = fit_temperature(logits, y)  # refuses non-finite logits (check_finite)
    before, after = apply_temperature(logits), apply_temperature(logits, fitted)
    e0, e1 = ece(before, y), ece(after, y)
    kept = None
    if min(abs(math.log(fitted / b)) for b in T_RANGE) < 0.01:
        kept = f"the fit landed on the edge of {T_RANGE[0]}..{T_RANGE[1]} (T = {fitted:.3g}): too few or too easy photos"
    elif e1 > e0:
        kept = f"T = {fitted:.3g} made the ECE worse ({e0:.4f} -> {e1:.4f})"
    t = 1.0 if kept else fitted
    out = {"temperature": t, "fitted": fitted, "fitted_on": fitted_on, "space": "logits",
           "ece_before": e0, "ece_after": ece(apply_temperature(logits, t), y),
           "nll_before": nll(logits, y, 1.0), "nll_after": nll(logits, y, t), "bins": ECE_BINS, "photos": int(len(y))}
    caution = few_people(people, "the temperature's fit") if people is not None else None
    return (out | ({"kept": f"T = 1 kept: {kept}"} if kept else {}) | ({"people": people} if people is not None else {})
            | ({"caution": caution} if caution else {}))
