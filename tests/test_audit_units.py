"""The audit's pure parts, on synthetic out-of-fold probabilities (milliseconds each): the 5/1/1 assignment,
fixes that apply to exactly one person in every layout, the cautions of a task not learned (per unit), and the
age boundary the model's classes use (issue 35)."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preprocess import labels as L

GIVEN = [0, 0, 0, 0, 0, 1, 2]  # mask1..mask5, incorrect_mask, normal


def _probs(true: list[int], sure: float = 0.9) -> np.ndarray:
    p = np.full((len(true), 3), (1 - sure) / 2)
    p[np.arange(len(true)), true] = sure
    return p


def test_there_are_42_assignments_and_the_best_one_is_exact():
    from classify.study.audit import assignments, best_assignment

    lp = np.log(np.random.default_rng(0).dirichlet(np.ones(3), 7))
    pairs, ll = assignments(lp)
    assert len(pairs) == 42 and len({tuple(p) for p in pairs}) == 42
    brute = max(((i, j) for i in range(7) for j in range(7) if i != j),
                key=lambda ij: sum(lp[k, 1 if k == ij[0] else 2 if k == ij[1] else 0] for k in range(7)))
    best, _ = best_assignment(np.exp(lp), GIVEN)
    assert (best.index(1), best.index(2)) == brute


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 6), st.integers(0, 6), st.floats(0.6, 0.99))
def test_the_structure_finds_the_true_assignment_and_scores_it(i, n, sure):
    from classify.study.audit import best_assignment

    if i == n:
        return
    true = [0] * 7
    true[i], true[n] = 1, 2
    best, score = best_assignment(_probs(true, sure), GIVEN)
    assert best == true  # a suspect (best != given) exactly when the given labels are wrong
    if true != GIVEN:
        assert score > 0.9  # and then the given assignment's posterior is small
    # (when the given labels are right, a model this unsure (sure 0.6) still spreads most of the posterior over
    # the 41 other assignments: no suspect is written, since the likeliest one is the given one)


def test_a_lone_photo_that_looks_incorrect_is_no_default_fix_but_the_swap_is():
    """The 59%-right file of the issue: single photos 'mask3 -> incorrect' would leave two incorrect photos."""
    from classify.study.audit import best_assignment

    p = _probs(GIVEN)
    p[2] = [0.3, 0.6, 0.1]  # mask3 looks incorrect, but the incorrect photo looks more so
    best, score = best_assignment(p, GIVEN)
    assert best == GIVEN and score < 0.5
    swapped = _probs([0, 0, 0, 0, 0, 2, 1])
    best, score = best_assignment(swapped, GIVEN)
    assert best == [0, 0, 0, 0, 0, 2, 1] and score > 0.99


def _rows(ids: list[str], people: list[str]) -> list[dict]:
    return [{"image_id": i, "person_id": p, "mask": 0, "gender": 0, "age": 25, "age_group": 0, "label": 0}
            for i, p in zip(ids, people)]


@pytest.mark.parametrize("layout", ["competition", "generic", "flat"])
def test_a_persons_fix_changes_exactly_that_persons_photos_in_every_layout(layout, tmp_path):
    from classify.data.dataset import apply_label_fixes
    from classify.study.audit import _fix_targets

    people = [f"p{k}" for k in range(3) for _ in range(3)]
    ids = {"competition": [f"00000{k}_male_Asian_25/{s}.jpg" for k in range(3) for s in "abc"],
           "generic": [f"images/{k}{s}.jpg" for k in range(3) for s in "abc"],  # every photo in one folder
           "flat": [f"{k}{s}.jpg" for k in range(3) for s in "abc"]}[layout]
    rows = _rows(ids, people)
    fixes = _fix_targets(rows)(("person:p1", "gender", "female"))
    assert len(fixes) == (1 if layout == "competition" else 3)
    path = tmp_path / "fixes.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["image_id", "field", "value"], *fixes])
    done = apply_label_fixes(rows, path, 60)
    assert [r["gender"] for r in rows] == [0, 0, 0, 1, 1, 1, 0, 0, 0] and done["changed"] == 3


def test_a_task_not_learned_per_unit_gets_a_caution_and_no_default_fix():
    from classify.metrics import unlearned_tasks
    from classify.study.audit import Suspect, _cautions, _default

    people = [f"p{k}" for k in range(30) for _ in range(7)]
    y = np.array([L.encode(GIVEN[j], k % 2, (k // 2) % 3) for k in range(30) for j in range(7)])
    assert _cautions(30, unlearned_tasks(y, y, people)) == []
    constant = np.zeros_like(y)
    said = _cautions(30, unlearned_tasks(y, constant, people))
    assert [c.split(":")[0] for c in said] == ["mask", "gender", "age"]
    assert "per photo 0.714" in said[0] and "per person" in said[1] and "no gender fix is written" in said[1]
    s = Suspect("person", "p1", "gender", "male", "female", 0.99, [])
    assert _default(s, None, unlearned_tasks(y, constant, people)) [0] is False
    assert _default(s, None, {})[0] is True
    assert _cautions(12, {})[0].startswith("the run holds 12 people")


def test_a_run_barely_above_the_most_common_label_writes_no_fix_of_that_task():
    """Out-of-identity folds on bench's 5-human workload: mask accuracy 0.733 per photo against 0.714 for the
    most common label, 420 photos; judged by the plain 'better than the baseline' its mask fixes were written
    and 16 of 34 were right. Audit asks for 2 standard errors of chance above it (0.758 here)."""
    from classify.metrics import learned_margin, unlearned_tasks
    from classify.study.audit import LEARNED_SE, _cautions

    people = [f"p{k}" for k in range(60) for _ in range(7)]
    y = np.array([L.encode(GIVEN[j], k % 2, 0) for k in range(60) for j in range(7)])
    p = y.copy()
    wrong = [i for i in range(len(y)) if L.task_parts(y[i:i + 1])[0][0] != 0][:112]  # 308 of 420 right: 0.733
    p[wrong] = y[wrong] % 6  # answered 'wear', gender and age kept
    mask_acc = float((L.task_parts(p)[0] == L.task_parts(y)[0]).mean())
    assert 0.714 < mask_acc < 0.74
    assert "mask" not in unlearned_tasks(y, p, people)  # the plain gate passes it
    judged = unlearned_tasks(y, p, people, margin_se=LEARNED_SE)
    assert "mask" in judged and "gender" not in judged
    need = {"mask": 5 / 7 + learned_margin(5 / 7, 420, LEARNED_SE)}
    assert need["mask"] == pytest.approx(0.758, abs=1e-3)
    said = _cautions(60, {"mask": judged["mask"]}, need)
    assert "by more than chance allows (it would need above 0.758)" in said[0] and "no mask fix" in said[0]
    # a run that learned the task clears it by far
    assert unlearned_tasks(y, y, people, margin_se=LEARNED_SE) == {}


def test_age_is_judged_at_the_models_boundary_so_a_58_year_old_is_no_suspect():
    pytest.importorskip("cleanlab")
    from classify.study.audit import _cleanlab, _person_suspects

    rows = []
    ages = [22, 45, 58, 59, 64, 25, 50, 58, 70, 33] * 3
    for k, age in enumerate(ages):
        rows += [{"image_id": f"{k:06d}_x/{j}.jpg", "person_id": f"{k:06d}", "mask": GIVEN[j], "gender": k % 2,
                  "age": age} for j in range(7)]
    p = np.zeros((len(rows), 3))
    p[np.arange(len(rows)), [L.age_group(r["age"], 58) for r in rows]] = 1.0  # a perfect model at --old 58
    p = 0.98 * p + 0.01
    find, quality = _cleanlab()
    assert _person_suspects(rows, p, "age", 58, find, quality) == []
    flagged = _person_suspects(rows, p, "age", 60, find, quality)  # judged at 60, it would flag the 58s and 59s
    assert flagged and all(s.given.startswith("30-59") for s in flagged)


def test_a_second_rounds_file_keeps_the_run_s_own_fixes_but_those_a_new_fix_replaces(tmp_path):
    """Applying the one file = applying the run's --label-fixes, then the new fixes (even where the first named a
    person by folder and the new one a photo of it)."""
    from classify.data.dataset import apply_label_fixes
    from classify.study.audit import _carried, _read_fixes

    ids = [f"00000{k}_male_Asian_25/{s}.jpg" for k in range(3) for s in "abc"]
    earlier_rows = [["000000_male_Asian_25", "gender", "female"], ["000001_male_Asian_25/a.jpg", "mask", "1"],
                    ["000002_male_Asian_25", "gender", "female"]]
    new = [("000000_male_Asian_25", "gender", "male"), ("000002_male_Asian_25/b.jpg", "gender", "male")]
    (tmp_path / "earlier.csv").write_text("image_id,field,value\n" + "".join(",".join(r) + "\n" for r in earlier_rows))
    earlier = _read_fixes(tmp_path / "earlier.csv")
    kept = _carried(earlier, new)
    assert kept == [tuple(earlier_rows[1]), tuple(earlier_rows[2])]  # person 0's gender row is replaced
    one, steps = _rows(ids, [i[:6] for i in ids]), _rows(ids, [i[:6] for i in ids])
    with open(tmp_path / "one.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image_id", "field", "value"], *kept, *new])
    with open(tmp_path / "new.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image_id", "field", "value"], *new])
    apply_label_fixes(one, tmp_path / "one.csv", 60)
    apply_label_fixes(steps, tmp_path / "earlier.csv", 60)
    apply_label_fixes(steps, tmp_path / "new.csv", 60)
    assert one == steps
    assert [r["gender"] for r in one] == [0, 0, 0, 0, 0, 0, 1, 0, 1] and one[3]["mask"] == 1
