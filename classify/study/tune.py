"""`maskcls tune`: a search over the training recipe with Optuna, in a study stored in a real database.

    maskcls tune CROPS --out STUDY --trials 40 [--storage URL] [--space FILE.toml] [--timeout S] [train options]

Each trial is a normal run folder `STUDY/trial-<k>/` (`report`, `compare`, `predict` work on it), trained
with the fixed train options plus the trial's sampled values. The objective is the validation macro F1 at
`--val-old` (with `--folds K --fold all`: the out-of-fold F1). The study lives in `STUDY/study.db` (SQLite)
or in any RDB URL Optuna accepts (`--storage postgresql://...`): every `maskcls tune` given the same
study joins it, which is how trials run in parallel, on one machine or many. Sampler: TPE, seeded;
pruning: Optuna's MedianPruner fed each epoch's validation F1 (a pruned trial keeps its run folder and
says why it stopped).

`--trials N` means N finished trials (complete or pruned) in the study, all processes together: each
process asks for a trial only while fewer are finished or running. A killed process's running trial is
marked failed when the study is next opened on that machine (its process is gone), or by Optuna's
heartbeat after `GRACE_S` on another machine, and its budget goes to a new trial.

At the end (of every process): `best.toml` (the best trial's whole configuration, for
`maskcls train --config`), `trials.csv`, `compare/` (the best five trials side by side), Optuna's
history and parameter-importance figures, and `index.html` (`tune_results.py`). The search space:
`tune_space.py`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

from classify.inference import rundir
from classify.training.config import TrainConfig
from classify.errors import ConfigError
from classify.study.tune_results import TuneResult, write_results
from classify.study.tune_space import Param, load_space

HEARTBEAT_S, GRACE_S = 20, 120  # a trial whose process stopped beating for GRACE_S is failed (another machine)
CREATE_TRIES = 5  # opening a fresh shared database: tries when another machine creates its tables at once
STUDY_NAME = "maskcls"
MAX_FAILED_IN_A_ROW = 3  # trials of this process that failed one after another: the study stops, saying why
PATH_OPTIONS = ("crops", "label_fixes", "groups", "weights")  # made absolute, so best.toml trains from any folder


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("maskcls tune needs Optuna: pip install 'maskcls[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial INFO lines would repeat ours
    return optuna


# -- the study ------------------------------------------------------------------------------------------------

def storage_url(out: Path, storage: str | None) -> str:
    return storage or f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def open_study(out: Path, storage: str | None, seed: int, startup: int, warmup: int):
    """The study (created, or joined when it exists) with its TPE sampler and MedianPruner."""
    optuna = _optuna()
    made = not Path(out).exists()
    Path(out).mkdir(parents=True, exist_ok=True)
    url = storage_url(out, storage)
    # Creating the tables and the study is not atomic in Optuna: two processes that start together on a
    # fresh database both run CREATE TABLE ("table ... already exists", "UNIQUE constraint failed:
    # alembic_version"). Processes of one machine take turns (the folder lock); processes of other machines
    # (a shared server database) retry, and the retry finds the tables the winner made.
    with _lock(out):
        for attempt in range(CREATE_TRIES):
            try:
                return _open(optuna, url, seed, startup, warmup)
            except Exception as e:  # sqlalchemy's OperationalError / IntegrityError, whose module is optional
                if type(e).__name__ in ("NoSuchModuleError", "ArgumentError"):  # a URL no driver opens: the user's
                    shown = re.sub(r"//[^@/]*@", "//***@", url)  # never print a password
                    if made:  # a refused option leaves nothing behind
                        shutil.rmtree(out, ignore_errors=True)
                    raise ConfigError(f"--storage {shown}: not a database URL Optuna can open "
                                      f"({str(e).splitlines()[0][:160]})") from None
                if attempt == CREATE_TRIES - 1 or type(e).__module__.split(".")[0] not in ("sqlalchemy", "sqlite3"):
                    raise
                time.sleep(0.5 * (attempt + 1))


def _open(optuna, url: str, seed: int, startup: int, warmup: int):
    import warnings

    with warnings.catch_warnings():  # heartbeats are "experimental since v2.9": stable, and what we need
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        # SQLite lets one writer at a time: wait up to a minute for the lock (sqlite3's default is 5 s, which
        # a busy machine with two tune processes exceeds: "database is locked").
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        store = optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                           grace_period=GRACE_S)
    sampler = trial_sampler(optuna, seed, 0)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
    return optuna.create_study(storage=store, study_name=STUDY_NAME, direction="maximize", sampler=sampler,
                               pruner=pruner, load_if_exists=True), store


def trial_sampler(optuna, seed: int, number: int):
    """The TPE sampler that draws trial `number`'s values, seeded by (seed, number). TPE keeps no state but
    its random generator (the history is read from the study), so a fresh sampler per trial loses nothing;
    and processes sharing a study draw different values for their different trial numbers, while one
    process alone is reproducible. (A sampler seeded once per process drew the same startup values in two
    processes that opened a fresh study together: trials 0 and 1, 2 and 3 were the same configuration.)"""
    return optuna.samplers.TPESampler(seed=(seed * 1_000_003 + number) % 2**32)


@contextlib.contextmanager
def _lock(out: Path):
    """Processes of one machine take turns to count and ask (so N trials means N, not N + a race)."""
    with open(Path(out) / ".tune.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fail_orphans(study, store) -> None:
    """Mark failed the running trials of this machine whose process is gone (a killed `maskcls tune`)."""
    optuna = _optuna()
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("host") == host and not _alive(t.user_attrs.get("pid")):
            store.set_trial_user_attr(t._trial_id, "stopped", "its process was gone (killed?); budget reused")
            store.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    import warnings

    with warnings.catch_warnings():  # "experimental since v2.9": stable for years, and what we need
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # other machines': by heartbeat


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ask(study):
    import warnings

    with warnings.catch_warnings():  # we beat the heart ourselves (_heartbeat): ask/tell has no thread for it
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        return study.ask()


@contextlib.contextmanager
def _heartbeat(store, trial, warn: Callable[[str], None] = print):
    """Record the trial's heartbeat every HEARTBEAT_S while it trains, so that processes on other
    machines can tell a killed trial (no beat for GRACE_S) from a slow one. A beat the storage refuses
    (a dropped connection, a locked database) is tried again at the next beat, and said once: a thread
    that died on it would let another process take this live trial for a dead one."""
    import threading

    stop = threading.Event()
    said = []

    def beat_once():
        try:
            store.record_heartbeat(trial._trial_id)
        except Exception as e:  # noqa: BLE001 - any storage error: the next beat tries again
            if not said:
                said.append(e)
                warn(f"trial {trial.number}: the study's storage refused a heartbeat ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); trying again every {HEARTBEAT_S} s")

    def beat():
        while not stop.wait(HEARTBEAT_S):
            beat_once()

    beat_once()
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _tell(study, trial, record: dict, out: Path, warn: Callable[[str], None]) -> None:
    """Record the trial's result in the study; a trial another process has meanwhile marked failed (its
    heartbeat looked stale) keeps that state, and its result is kept in its folder (result.json) instead
    of raising and losing it."""
    optuna = _optuna()
    state = study._storage.get_trial(trial._trial_id).state
    if state == optuna.trial.TrialState.RUNNING:
        try:
            if record["state"] == "COMPLETE":
                study.tell(trial, record["value"])
            else:
                study.tell(trial, state=getattr(optuna.trial.TrialState, record["state"]))
            return
        except (RuntimeError, ValueError):  # finished by another machine between the look and the tell
            state = study._storage.get_trial(trial._trial_id).state
            if state == optuna.trial.TrialState.RUNNING:
                raise
    rundir.write_json(Path(record["run"]) / "result.json", record | {"recorded_as": state.name})
    warn(f"trial {trial.number} finished ({record['state']}"
             f"{', value ' + format(record['value'], '.4f') if record.get('value') is not None else ''}), but another "
             f"process had already marked it {state.name} (its heartbeat looked stale): the study keeps "
             f"{state.name}; the result is in {record['run']}/result.json")


def _counts(study) -> tuple[int, int]:
    optuna = _optuna()
    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    return sum(t.state in (S.COMPLETE, S.PRUNED) for t in trials), sum(t.state == S.RUNNING for t in trials)


def tune(fixed: dict, out: Path, trials: int, storage: str | None = None, space: Path | None = None,
         timeout: float | None = None, seed: int = 0, prune_startup: int = 5, prune_warmup: int = 1,
         on_trial: Callable[[dict], None] | None = None, warn: Callable[[str], None] = print,
         fixed_names: set[str] = frozenset()) -> TuneResult:
    """Run trials until the study holds `trials` finished ones (or `timeout` seconds pass), then write
    the results. `fixed`: the train options every trial shares (crops included); `fixed_names`: those the
    user gave, which the search leaves alone."""
    if trials < 1:
        raise ConfigError(f"--trials {trials}: must be >= 1")
    out = Path(out)
    base = _absolute({k: v for k, v in fixed.items() if v is not None})
    first = TrainConfig(**(base | {"out": str(out / "trial-0")}))
    first.check()  # the fixed part is refused before any trial, and so is data it cannot train on
    from classify.data.dataset import prepare_data, validation_caution
    from classify.training.train import once_each

    data = prepare_data(dataclasses.replace(first, fold=0) if first.fold == "all" else first)
    every = first.fold == "all"  # the objective: out-of-fold F1 over every person, or one validation's
    caution = validation_caution(data, every, "every trial's " + ("out-of-fold score" if every else "validation"))
    # a trial's fit says what the trial before it said (and what `caution` says here, of the same people): once
    warn_once = once_each(warn, already=[validation_caution(data, every)])

    params = load_space(space, base | {"out": str(out / "trial-0")})
    held = [p.name for p in params if p.name in fixed_names]
    if held:
        warn(f"fixed by your options, so not searched: {', '.join(held)}")
        params = [p for p in params if p.name not in fixed_names]
    study, store = open_study(out, storage, seed, prune_startup, prune_warmup)
    study.set_user_attr("fixed", json.loads(json.dumps(base)))  # best.toml = these + the best trial's params
    study.set_user_attr("caution", caution)  # shown beside the study's figures
    if caution:  # said once every up-front check has passed: a refused space or storage is one line alone
        warn_once(caution)
    optuna = _optuna()
    t_end = time.monotonic() + timeout if timeout else math.inf
    mine, failed = 0, []
    while time.monotonic() < t_end:
        with _lock(out):
            _fail_orphans(study, store)
            finished, running = _counts(study)
            trial = _ask(study) if finished + running < trials else None
            if trial is not None:
                study.sampler = trial_sampler(optuna, seed, trial.number)  # draws this trial's values
                trial.set_user_attr("host", socket.gethostname())
                trial.set_user_attr("pid", os.getpid())
        if trial is None:
            if running == 0 or finished >= trials:
                break
            time.sleep(2)  # others' trials are running: if one fails, its budget comes back
            continue
        with _heartbeat(store, trial, warn_once):
            record = _run_trial(trial, params, base, out, warn_once)
        mine += 1
        with _lock(out):
            _tell(study, trial, record, out, warn_once)
        if on_trial:
            on_trial(record)
        failed = failed + [record] if record["state"] == "FAIL" else []
        if len(failed) >= MAX_FAILED_IN_A_ROW:
            write_results(study, out, mine)
            raise ConfigError(f"{len(failed)} trials in a row failed, so the study stops; the first, trial "
                              f"{failed[0]['number']}: {failed[0]['why']}")
    return write_results(study, out, mine)


def _absolute(base: dict) -> dict:
    """The fixed options with their paths absolute (weights only where it names a file)."""
    out = dict(base)
    for k in PATH_OPTIONS:
        v = out.get(k)
        if isinstance(v, str) and v and (k != "weights" or Path(v).exists()):
            out[k] = str(Path(v).resolve())
    if out.get("extra"):
        out["extra"] = [str(Path(v).resolve()) for v in out["extra"]]
    return out


def _run_trial(trial, params: list[Param], base: dict, out: Path, warn) -> dict:
    """Train one trial into STUDY/trial-<k>; (state, value) for the study."""
    from classify.training.train import fit

    optuna = _optuna()
    values = {p.name: p.suggest(trial) for p in params}
    folder = out / f"trial-{trial.number}"
    cfg = TrainConfig(**(base | values | {"out": str(folder)}))
    trial.set_user_attr("run", str(folder))
    per_fold = cfg.epochs

    def report(rec: dict) -> None:
        step = rec.get("fold", 0) * per_fold + rec["epoch"]
        trial.report(rec["val_f1"], step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"epoch {rec['epoch']}{' of fold ' + str(rec['fold']) if 'fold' in rec else ''}: "
                                     f"validation F1 {rec['val_f1']:.4f} below the median of earlier trials there")

    record = {"number": trial.number, "params": values, "run": str(folder)}
    try:
        summary = fit(cfg, overwrite=True, on_epoch=report, warn=warn)
    except optuna.TrialPruned as e:
        rundir.write_json(folder / "pruned.json", {"stopped_by": "maskcls tune (Optuna MedianPruner)", "why": str(e)})
        trial.set_user_attr("stopped", f"pruned: {e}")
        return record | {"state": "PRUNED", "value": None, "why": str(e)}
    except Exception as e:  # noqa: BLE001 - a refused combination, a diverging loss, CUDA out of memory...:
        # this trial fails with its reason, not the study (Ctrl-C, a BaseException, still stops everything)
        why = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        trial.set_user_attr("stopped", f"failed: {why}")
        return record | {"state": "FAIL", "value": None, "why": why}
    value = summary["oof"]["f1"] if "oof" in summary else summary["best"]["val_f1"]
    unlearned = list((summary.get("validation") or {}).get("not_learned") or {})
    trial.set_user_attr("not_learned", unlearned)  # a best trial that learned nothing is no recipe: said at the end
    return record | {"state": "COMPLETE", "value": float(value), "not_learned": unlearned}


