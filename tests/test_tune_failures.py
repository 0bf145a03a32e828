"""maskcls tune under failing trials (issue 29): any exception of a trial fails that trial with its reason and
the study goes on; trials failing in a row stop it with one line; data a trial cannot train on is refused
before the first; best.toml comes from the study (fixed options + the best trial's parameters, paths
absolute) even where the trial's folder is not; an option given on the command line is never searched.
`fit` is replaced by a stand-in here: what is tested is the study's bookkeeping, not training."""
from __future__ import annotations

import csv
import shutil
import tomllib

import pytest

from tests.conftest import make_crops

pytest.importorskip("optuna")

SPACE = '[lr]\nlow = 1e-4\nhigh = 3e-3\nlog = true\n[dropout]\nlow = 0.0\nhigh = 0.5\n'


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    return make_crops(tmp_path_factory.mktemp("crops"), people=12, size=16)


def _fixed(crops, **kw):
    return dict(crops=str(crops), epochs=1, img_size=32, workers=0, weights="none", device="cpu", preset="none",
                model="resnet18") | kw


def _trials(out):
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def fake_fit(monkeypatch):
    """fit() stand-in: calls[k] is the k-th trial's config; `plan[k]` an exception to raise, else F1 = 1 - lr."""
    import classify.training.train as T

    calls, plan = [], {}

    def fit(cfg, **kw):
        calls.append(cfg)
        (T.Path(cfg.out)).mkdir(parents=True, exist_ok=True)
        if len(calls) - 1 in plan:
            raise plan[len(calls) - 1]
        return {"best": {"val_f1": 1.0 - cfg.lr}}

    monkeypatch.setattr(T, "fit", fit)
    return calls, plan


def test_a_diverging_or_out_of_memory_trial_fails_alone_and_the_study_goes_on(crops, tmp_path, fake_fit):
    from classify.errors import TrainingError
    from classify.study.tune import tune

    calls, plan = fake_fit
    plan[0] = TrainingError("the loss is not finite at epoch 1, step 3")
    plan[2] = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    (tmp_path / "space.toml").write_text(SPACE)
    res = tune(_fixed(crops), tmp_path / "s", trials=3, space=tmp_path / "space.toml", warn=lambda m: None)
    rows = _trials(tmp_path / "s")
    assert res.finished == 3 and [r["state"] for r in rows] == ["FAIL", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert "not finite" in rows[0]["note"] and "RuntimeError: CUDA out of memory" in rows[2]["note"]


def test_trials_failing_in_a_row_stop_the_study_with_one_line_naming_the_first(crops, tmp_path, fake_fit):
    from classify.errors import ConfigError
    from classify.study.tune import MAX_FAILED_IN_A_ROW, tune

    calls, plan = fake_fit
    plan.update({k: RuntimeError(f"boom {k}") for k in range(10)})
    (tmp_path / "space.toml").write_text(SPACE)
    with pytest.raises(ConfigError, match="3 trials in a row failed.*trial 0: RuntimeError: boom 0"):
        tune(_fixed(crops), tmp_path / "s", trials=2, space=tmp_path / "space.toml", warn=lambda m: None)
    assert len(calls) == MAX_FAILED_IN_A_ROW and len(_trials(tmp_path / "s")) == MAX_FAILED_IN_A_ROW


@pytest.mark.parametrize("kw, words", [(dict(folds=13, fold="all"), "--folds 13: more folds than the 12 people"),
                                       (dict(label_fixes="FIXES"), "fix")])
def test_data_no_trial_can_train_on_is_refused_before_the_first_trial(crops, tmp_path, fake_fit, kw, words):
    from classify.errors import ConfigError
    from classify.study.tune import tune

    if kw.get("label_fixes"):
        (tmp_path / "fixes.csv").write_text("image_id,field,value\n9999/mask1,gender,male\n")  # an unknown id
        kw = {"label_fixes": str(tmp_path / "fixes.csv")}
    with pytest.raises(ConfigError, match=words):
        tune(_fixed(crops, **kw), tmp_path / "s", trials=2, warn=lambda m: None)
    assert fake_fit[0] == [] and not (tmp_path / "s" / "trial-0").exists()


def test_best_toml_comes_from_the_study_with_absolute_paths_and_a_given_option_is_never_searched(
        crops, tmp_path, fake_fit, monkeypatch):
    from classify.study.tune import tune
    from classify.study.tune_results import write_results

    calls, _ = fake_fit
    (tmp_path / "space.toml").write_text(SPACE)
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    rel = shutil.copytree(crops, work / "c")
    res = tune(_fixed("c", lr=0.002), tmp_path / "s", trials=3, space=tmp_path / "space.toml", warn=lambda m: None,
               fixed_names={"lr"})
    assert [c.lr for c in calls] == [0.002] * 3 and len({c.dropout for c in calls}) == 3
    assert "lr" not in _trials(tmp_path / "s")[0]
    for t in range(3):  # another machine: the trials' folders are not here
        shutil.rmtree(tmp_path / "s" / f"trial-{t}")
    (tmp_path / "s" / "best.toml").unlink()
    write_results(res.study, tmp_path / "s", 0)
    best = tomllib.loads((tmp_path / "s" / "best.toml").read_text())["train"]
    assert best["crops"] == str(rel.resolve()) and best["lr"] == 0.002
    assert best["dropout"] == res.best["params"]["dropout"] and best["epochs"] == 1 and best["model"] == "resnet18"
