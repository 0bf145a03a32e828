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


def test_a_heartbeat_the_storage_refuses_is_said_once_and_the_beats_go_on(monkeypatch):
    """Issue 34, item 10: the heartbeat thread died on the first storage error, so another process took the
    still-running trial for a dead one."""
    import time

    import classify.study.tune as tune_mod

    monkeypatch.setattr(tune_mod, "HEARTBEAT_S", 0.02)
    beats, said = [], []

    class Store:
        def record_heartbeat(self, trial_id):
            beats.append(time.monotonic())
            if len(beats) in (2, 3):
                raise RuntimeError("server closed the connection unexpectedly")

    trial = type("Trial", (), {"_trial_id": 7, "number": 3})()
    with tune_mod._heartbeat(Store(), trial, said.append):
        deadline = time.monotonic() + 5
        while len(beats) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(beats) >= 6  # beating on after the refusals
    assert len(said) == 1 and "trial 3: the study's storage refused a heartbeat (RuntimeError" in said[0]
    n = len(beats)
    time.sleep(0.1)
    assert len(beats) == n  # and the beats stop with the trial


def test_a_trial_another_process_failed_keeps_its_result_and_raises_nothing(tmp_path):
    import json

    import optuna

    from classify.study.tune import _tell

    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)  # "stale" elsewhere
    (tmp_path / "trial-0").mkdir()
    said = []
    record = {"number": trial.number, "params": {"lr": 0.001}, "run": str(tmp_path / "trial-0"),
              "state": "COMPLETE", "value": 0.81}
    _tell(study, trial, record, tmp_path, said.append)
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
    kept = json.loads((tmp_path / "trial-0" / "result.json").read_text())
    assert kept["value"] == 0.81 and kept["recorded_as"] == "FAIL"
    assert len(said) == 1 and "another process had already marked it FAIL" in said[0]
    fresh = study.ask()  # and a running trial is told as usual
    _tell(study, fresh, record | {"number": fresh.number, "value": 0.5}, tmp_path, said.append)
    assert study.trials[1].state == optuna.trial.TrialState.COMPLETE and study.trials[1].value == 0.5


def test_a_study_of_diverging_trials_ends_by_itself_every_trial_failed(crops, tmp_path, cli_run):
    """Real training at --lr 1e6: each trial stops at its divergence (FAIL, with the reason), and the study
    stops after MAX_FAILED_IN_A_ROW of them with one error line, no traceback."""
    res = cli_run("tune", crops, "--out", tmp_path / "s", "--trials", "5", "--lr", "1e6", "--epochs", "1",
                  "--img-size", "32", "--workers", "0", "--weights", "none", "--device", "cpu", "--preset", "none",
                  "--model", "resnet18", timeout=600)
    out = res.stdout + res.stderr
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert res.returncode == 1 and len(errors) == 1 and "3 trials in a row failed" in errors[0], out[-3000:]
    assert "diverged" in errors[0] and "Traceback" not in out
    rows = _trials(tmp_path / "s")
    assert [r["state"] for r in rows] == ["FAIL"] * 3 and all("diverged" in r["note"] for r in rows)


def test_a_study_with_no_complete_trial_draws_no_figure_and_says_nothing_on_the_terminal(tmp_path, capfd):
    """A study whose trials all failed (a diverged recipe): Optuna's history figure logged "[W ...] There are
    no complete trials." onto the user's terminal."""
    import optuna

    from classify.study.tune_results import _figures

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for _ in range(2):
        study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    made = _figures(study, tmp_path)
    out, err = capfd.readouterr()
    assert "There are no complete trials" not in out + err and err.strip() == ""
    assert [m[0] for m in made] == [None, None] and all("no trial has completed" in m[1] for m in made)
