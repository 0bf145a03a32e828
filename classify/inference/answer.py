"""From logits to the answer: the one function that predict, evaluate, pseudo-label and serve call, whichever
backend (a torch checkpoint, an onnxruntime graph) produced the logits. Numpy only, float64.

    logits of each model, V TTA views x N photos x 18
      → mean over the views of softmax(z) the model's TTA probabilities
      → softmax(log p / T)                its temperature (for one view: softmax(z / T), in logit space)
      → soft mean or hard vote over models
      → class (0..17), and per task the class's own part with its marginal probability

so a checkpoint and its ONNX export give the same probabilities (their logits agree to float32 rounding),
and an answer's task labels are always the parts of its class (`task_values`): they never contradict it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from preprocess import labels as L

from classify.inference.calibration import apply_temperature
from classify.errors import ConfigError

VOTES = ("soft", "hard")


@dataclass
class Answer:
    scores: np.ndarray   # N x 18: the models' mean probability, whatever the vote (never a vote share)
    labels: np.ndarray   # N classes (the vote's)
    probs: np.ndarray    # M x N x 18: each model's probabilities
    votes: np.ndarray | None = None  # hard vote: N x 18, the share of models voting for each class

    @property
    def confidence(self) -> np.ndarray:
        """N: the mean probability of each photo's own class (its label's, not the vote's share)."""
        return class_probability(self.scores, self.labels)


def class_probability(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """N: each row's probability of its own class `labels` (scores N x 18): what every threshold reads."""
    labels = np.asarray(labels, dtype=int)
    return np.asarray(scores)[np.arange(len(labels)), labels] if len(labels) else np.zeros(0)


def model_probs(views: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """One model's logits, V views x N x 18 → its probabilities N x 18: for one view softmax(z / T); for
    several, the temperature applied to the log of the views' mean probability, so T never changes the top
    class of the mean. Measured (BENCHMARKS §13, tta 4, two workloads): T per view before the mean instead
    raised the NLL (0.378 vs 0.364, 0.366 vs 0.340) and, with T < 1, cost 2.9 points of accuracy on one."""
    views = np.asarray(views, dtype=np.float64)
    if views.ndim == 2:
        views = views[None]
    if len(views) == 1:
        return apply_temperature(views[0], temperature)
    mean = apply_temperature(views).mean(0)
    return apply_temperature(np.log(np.maximum(mean, np.finfo(np.float64).tiny)), temperature)


def answer(logits: list[np.ndarray], temperatures: list[float], calibrate: bool = True, vote: str = "soft") -> Answer:
    """The answer of M models for N photos. `logits[m]` is model m's V x N x 18 (or N x 18) logits;
    `calibrate` applies each model's temperature."""
    check_vote(vote)
    if len(logits) != len(temperatures):
        raise ValueError(f"{len(logits)} models but {len(temperatures)} temperatures")
    probs = np.stack([model_probs(z, t if calibrate else 1.0) for z, t in zip(logits, temperatures)])
    scores, labels, votes = combine(probs, vote)
    return Answer(scores, labels, probs, votes)


def check_vote(vote: str) -> None:
    if vote not in VOTES:
        raise ConfigError(f"--vote {vote!r}: choose soft or hard")


def combine(probs: np.ndarray, vote: str = "soft") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """M x N x 18 → (mean probability N x 18, labels N, vote shares N x 18 or None). soft: the top class
    of the mean. hard: the majority of the models' top classes; a tie goes to the tied class with the
    highest mean probability. The shares are a count of models, not a probability (one model's share is
    1.0 for every photo): thresholds read the mean probability of the voted class, `Answer.confidence`."""
    check_vote(vote)
    probs = np.asarray(probs, dtype=np.float64)
    mean = probs.mean(0)
    if vote == "soft":
        return mean, mean.argmax(1), None
    votes = np.zeros_like(mean)
    for top in probs.argmax(2):
        votes[np.arange(len(top)), top] += 1
    tied = votes == votes.max(1, keepdims=True)
    labels = np.where(tied, mean, -1.0).argmax(1)
    return mean, labels, votes / len(probs)


def task_marginals(probs: np.ndarray) -> dict[str, np.ndarray]:
    """Each task's marginal probabilities of 18-class probabilities (... x 18 → ... x 3, ... x 2, ... x 3):
    the sum over the classes that have each value of the task."""
    probs = np.asarray(probs)
    return {task: np.stack([probs[..., part == k].sum(-1) for k in range(len(names))], axis=-1)
            for (task, names), part in zip(L.TASKS.items(), L.task_parts(np.arange(L.NUM_CLASSES)))}


def task_values(scores: np.ndarray, label: int, old: int = L.DEFAULT_OLD, tasks: dict | None = None) -> dict:
    """Per task, the part of class `label` (mask, gender, age group) and its marginal probability under
    `scores` (18): {'mask': {'label': 'wear', 'prob': 0.34}, ...}. The labels are the class's own, so a
    served answer's task fields can never name another class than its `class` (a marginal's argmax can:
    .34 wear/m/<30, .33 incorrect/m/<30, .33 incorrect/f/<30 has class wear, marginal argmax incorrect). `tasks`: each task's names, from the
    model's card (its `tasks`); without it they are rebuilt at `old`."""
    marginals = task_marginals(scores)
    out = {}
    for (task, names), part in zip(L.TASKS.items(), L.decode(int(label))):
        names = tasks[task] if tasks else (L.age_names(old) if task == "age" else names)
        out[task] = {"label": names[part], "prob": float(marginals[task][part])}
    return out
