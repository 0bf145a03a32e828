"""Which face is the subject: the labelled person's face among every face the detector found.

A photo can hold more than one face: a bystander, a poster, a face on a T-shirt. MTCNN often scores
such a bare face above the subject's masked one, so "the largest, most confident face" crops the
wrong person, with a confident score. Two things know better than a photo alone:

- **The person's other photos** (`choose_for_person`). A person's seven photos share their framing,
  and the unmasked and incorrectly-masked ones, which MTCNN finds easily, anchor it. Candidates of all
  the photos are grouped by where they sit (relative to the photo); the group found in the most
  photos, weighted by score and by the prior, is the subject, and in each photo the candidate of that
  group is chosen. A photo with no candidate there gets the group's median box (`person_box`),
  whatever else it found, and the row's reason says what was passed over.
- **A prior over where faces sit** (`Prior`, for a lone photo: the eval set, or a folder without
  person ids). A Gaussian over the face's relative centre and log size, learned from a training
  folder's chosen boxes (`Prior.learn`), stored in crops.json and in the checkpoint, so predict crops
  eval photos as the training photos were cropped. It chooses among a lone photo's candidates, and
  when none is plausible, its mean box stands in (`prior_box`, instead of a blind centre square).

Pure numpy over plain tuples: the crop stage calls it, the tests call it with made-up candidates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# A candidate face: box (x1, y1, x2, y2) in the photo's pixels, detector score, the pass that found it
# ('ok' for the fast pass, 'relaxed' for the second), landmarks (5 (x, y) or None).
Candidate = tuple[tuple[float, float, float, float], float, str, tuple | None]

PLAUSIBLE_D2 = 21.1   # squared Mahalanobis distance of the chi-square (3 dof) 0.9999 quantile
SAME_PLACE = 0.3      # relative-box IoU above which two photos' candidates are the same face
CONSISTENT = 0.4      # IoU with the person's box above which a candidate is that person's face
MIN_SD = (0.04, 0.04, 0.08)  # floor of the prior's spread (a tight training set must not reject near misses)


@dataclass(frozen=True)
class Choice:
    """What the crop stage does with one photo: crop `box`; `index` is the chosen candidate (None: a fallback)."""
    box: tuple[float, float, float, float] | None
    index: int | None
    status: str               # ok | relaxed | person_box | prior_box
    reason: str = ""


@dataclass(frozen=True)
class Prior:
    """Where the subject's face sits in a photo: a Gaussian over (centre x / width, centre y / height,
    log(face side / shorter photo side))."""
    mean: tuple[float, float, float]
    cov: tuple[tuple[float, float, float], ...]
    n: int = 0                # photos it was learned from (0: the built-in default)
    source: str = "built-in default"

    @staticmethod
    def features(box, w: int, h: int) -> np.ndarray:
        x1, y1, x2, y2 = box
        side = max(math.sqrt(max(x2 - x1, 1e-3) * max(y2 - y1, 1e-3)), 1e-3)
        return np.array([(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, math.log(side / min(w, h))])

    def distance2(self, box, w: int, h: int) -> float:
        d = self.features(box, w, h) - np.array(self.mean)
        return float(d @ np.linalg.solve(np.array(self.cov), d))

    def utility(self, box, score: float, w: int, h: int) -> float:
        """log(score) + log(prior density ratio): how much a candidate looks like the subject."""
        return math.log(max(score, 1e-6)) - 0.5 * self.distance2(box, w, h)

    def plausible(self, box, w: int, h: int) -> bool:
        return self.distance2(box, w, h) <= PLAUSIBLE_D2

    def box(self, w: int, h: int) -> tuple[float, float, float, float]:
        """The mean face box in a w x h photo."""
        cx, cy, logside = self.mean
        half = math.exp(logside) * min(w, h) / 2
        return (cx * w - half, cy * h - half, cx * w + half, cy * h + half)

    @classmethod
    def learn(cls, boxes: list[tuple[tuple[float, float, float, float], int, int]], source: str = "") -> "Prior":
        """Fit to (box, width, height) of chosen faces; the spread is floored by MIN_SD."""
        x = np.array([cls.features(b, w, h) for b, w, h in boxes])
        cov = np.cov(x.T) if len(x) > 1 else np.zeros((3, 3))
        cov = cov + np.diag(np.square(MIN_SD))
        return cls(tuple(float(v) for v in x.mean(0)), tuple(tuple(float(v) for v in row) for row in cov), len(x),
                   source or f"learned from {len(x)} photos")

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "cov": [list(r) for r in self.cov], "n": self.n, "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "Prior":
        mean, cov = tuple(float(v) for v in d["mean"]), tuple(tuple(float(v) for v in r) for r in d["cov"])
        if len(mean) != 3 or len(cov) != 3 or any(len(r) != 3 for r in cov):
            raise ValueError("a face prior needs a mean of 3 and a 3x3 covariance")
        return cls(mean, cov, int(d.get("n", 0)), str(d.get("source", "")))


# A portrait: the face near the middle, a little above it, about 0.45 of the shorter side wide; broad
# enough for most framings, narrow enough that a face cut by the photo's edge is unlikely.
DEFAULT_PRIOR = Prior((0.5, 0.45, math.log(0.45)), ((0.15 ** 2, 0, 0), (0, 0.15 ** 2, 0), (0, 0, 0.4 ** 2)))


def _rel(box, w: int, h: int) -> np.ndarray:
    return np.array([box[0] / w, box[1] / h, box[2] / w, box[3] / h])


def iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _fmt_box(box) -> str:
    return "(" + ", ".join(f"{v:.0f}" for v in box) + ")"


def _naive(cands: list[Candidate]) -> int:
    """What a plain loop keeps: the largest, most confident face (area x score)."""
    return int(np.argmax([(b[2] - b[0]) * (b[3] - b[1]) * s for b, s, *_ in cands]))


def _found(cands: list[Candidate], k: int) -> Choice:
    box, score, how, _ = cands[k]
    reason = ""
    if len(cands) > 1 and _naive(cands) != k:
        b, s, *_ = cands[_naive(cands)]
        reason = f"the subject, not the larger or higher-scoring face at {_fmt_box(b)} (score {s:.2f})"
    return Choice(tuple(box), k, how, reason)


def _passed_over(cands: list[Candidate], where: str) -> str:
    """The reason of a fallback box: what the photo had, elsewhere than `where`."""
    if not cands:
        return "no face found"
    b, s, *_ = cands[_naive(cands)]
    more = f" and {len(cands) - 1} more" if len(cands) > 1 else ""
    return f"no face {where}; passed over the face at {_fmt_box(b)} (score {s:.2f}){more}"


def choose_lone(cands: list[Candidate], w: int, h: int, prior: Prior) -> Choice:
    """A photo with no other photos of its person: the most likely candidate under `prior`, among the
    plausible ones; none plausible → the prior's box (`prior_box`)."""
    ok = [k for k, (b, *_) in enumerate(cands) if prior.plausible(b, w, h)]
    if ok:
        k = max(ok, key=lambda k: prior.utility(cands[k][0], cands[k][1], w, h))
        return _found(cands, k)
    return Choice(prior.box(w, h), None, "prior_box", _passed_over(cands, f"where faces sit ({prior.source})"))


def person_box(photos: list[tuple[list[Candidate], int, int]], prior: Prior) -> np.ndarray | None:
    """The person's face box, relative to the photo (x1/w, y1/h, x2/w, y2/h): the median of the best
    group of candidates found in the same place across photos, or None if no photo has a candidate."""
    items = []  # (utility, photo, relative box)
    for p, (cands, w, h) in enumerate(photos):
        for box, score, *_ in cands:
            items.append((prior.utility(box, score, w, h), p, _rel(box, w, h)))
    if not items:
        return None
    items.sort(key=lambda t: -t[0])
    groups: list[dict] = []  # each: seed box, photos, members' boxes, value
    for u, p, rel in items:
        for g in groups:
            if iou(g["seed"], rel) >= SAME_PLACE:
                break
        else:
            g = {"seed": rel, "photos": set(), "boxes": [], "value": 0.0}
            groups.append(g)
        if p in g["photos"]:
            continue  # a second candidate of this photo in the same place: the better one is in already
        g["photos"].add(p)
        g["boxes"].append(rel)
        g["value"] += math.exp(u)  # score x prior density ratio, summed over the photos it appears in
    best = max(groups, key=lambda g: g["value"])
    return np.median(np.array(best["boxes"]), axis=0)


def choose_for_person(photos: list[tuple[list[Candidate], int, int]], prior: Prior) -> list[Choice]:
    """One Choice per photo of a person (candidates, width, height of each): the candidate in the
    person's place (the highest-scoring one there), else the person's box."""
    rel = person_box(photos, prior)
    if rel is None:
        return [choose_lone(c, w, h, prior) for c, w, h in photos]
    out = []
    for cands, w, h in photos:
        pbox = (rel[0] * w, rel[1] * h, rel[2] * w, rel[3] * h)
        there = [k for k, (b, *_) in enumerate(cands) if iou(b, pbox) >= CONSISTENT]
        if there:
            out.append(_found(cands, max(there, key=lambda k: cands[k][1])))
        else:
            out.append(Choice(pbox, None, "person_box", _passed_over(cands, "where this person's face is")))
    return out
