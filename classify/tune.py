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
history and parameter-importance figures, and `index.html`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import socket
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from preprocess.imageio import atomic_write_bytes

from . import rundir
from .config import TrainConfig, check_types
from .errors import ConfigError

HEARTBEAT_S, GRACE_S = 20, 120  # a trial whose process stopped beating for GRACE_S is failed (another machine)
CREATE_TRIES = 5  # opening a fresh shared database: tries when another machine creates its tables at once
STUDY_NAME = "maskcls"
KINDS = ("float", "int", "categorical")

# The default search space (README "Tune the recipe"): name → spec.
DEFAULT_SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
    "backbone_lr": {"type": "float", "low": 0.03, "high": 1.0, "log": True},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "loss": {"type": "categorical", "choices": ["wce", "ce", "focal", "smooth"]},
    "preset": {"type": "categorical", "choices": ["base", "strong"]},
    "mix": {"type": "categorical", "choices": ["none", "cutmix", "mixup", "vcutmix"]},
    "ema": {"type": "categorical", "choices": [0.0, 0.99, 0.999]},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "img_size": {"type": "categorical", "choices": [224, 256, 288]},
    "old": {"type": "categorical", "choices": [58, 59, 60]},
}


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("maskcls tune needs Optuna: pip install 'maskcls[tune]'") from None
    return optuna


# -- the search space ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    name: str
    kind: str                 # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial):
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


def load_space(path: Path | None, fixed: dict) -> list[Param]:
    """The search space (the default, or a TOML file of `[name]` tables with `type` float|int|categorical
    and `low`/`high` (`log`) or `choices`), every parameter checked against TrainConfig before any trial:
    an unknown name, an empty or inverted range, or a value the option refuses is one error."""
    where = f"--space {path}" if path else "the default search space"
    if path is None:
        spec = DEFAULT_SPACE
    else:
        try:
            spec = tomllib.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"--space {path}: {e}") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"crops", "out"}
    params = []
    for name, s in spec.items():
        if name not in known:
            raise ConfigError(f"{where}: {name!r} is not a train option (known: {', '.join(sorted(known))})")
        if not isinstance(s, dict):
            raise ConfigError(f"{where}: [{name}] must be a table with type and low/high or choices")
        params.append(_param(name, s, where))
    for p in params:  # every value the search may take must be one train accepts
        for v in (p.choices if p.kind == "categorical" else (p.low, p.high)):
            value = int(v) if p.kind == "int" else v
            try:
                TrainConfig(**(fixed | {p.name: value})).check()
            except (ConfigError, TypeError) as e:
                raise ConfigError(f"{where}: {p.name} = {value!r} cannot train: {e}") from None
    return params


def _param(name: str, s: dict, where: str) -> Param:
    kind = s.get("type", "categorical" if "choices" in s else "float")
    extra = sorted(set(s) - {"type", "low", "high", "log", "choices"})
    if kind not in KINDS or extra:
        raise ConfigError(f"{where}: [{name}] type {kind!r} / keys {extra}: use type = float | int | categorical "
                          "with low, high (log) or choices")
    if kind == "categorical":
        choices = s.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: [{name}] needs a non-empty list of choices")
        check_types({name: choices[0]}, f"{where}: [{name}] ")
        return Param(name, kind, choices=tuple(choices))
    low, high, log = s.get("low"), s.get("high"), bool(s.get("log", False))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
        raise ConfigError(f"{where}: [{name}] needs numbers low < high, got low = {low!r}, high = {high!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: [{name}] log = true needs low > 0, got {low}")
    return Param(name, kind, float(low), float(high), log)


# -- the study ------------------------------------------------------------------------------------------------

@dataclass
class TuneResult:
    study: object
    out: Path
    best: dict | None         # {"number", "value", "params", "run"} of the best complete trial
    finished: int
    mine: int                 # trials this process ran


def storage_url(out: Path, storage: str | None) -> str:
    return storage or f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def open_study(out: Path, storage: str | None, seed: int, startup: int, warmup: int):
    """The study (created, or joined when it exists) with its TPE sampler and MedianPruner."""
    optuna = _optuna()
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
    # Each process seeds its sampler with the seed and its pid: one process alone is reproducible, and two
    # processes joining one study do not propose the very same values.
    sampler = optuna.samplers.TPESampler(seed=seed if not _joined(store) else seed + os.getpid())
    pruner = optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
    return optuna.create_study(storage=store, study_name=STUDY_NAME, direction="maximize", sampler=sampler,
                               pruner=pruner, load_if_exists=True), store


def _joined(store) -> bool:
    """Whether the study already has trials (this process joins it)."""
    try:
        sid = store.get_study_id_from_name(STUDY_NAME)
    except KeyError:
        return False
    return bool(store.get_all_trials(sid, deepcopy=False))


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
def _heartbeat(store, trial):
    """Record the trial's heartbeat every HEARTBEAT_S while it trains, so that processes on other
    machines can tell a killed trial (no beat for GRACE_S) from a slow one."""
    import threading

    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            store.record_heartbeat(trial._trial_id)

    store.record_heartbeat(trial._trial_id)
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


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
    base = {k: v for k, v in fixed.items() if v is not None}
    TrainConfig(**(base | {"out": str(out / "trial-0")})).check()  # the fixed part is refused before any trial
    params = load_space(space, base | {"out": str(out / "trial-0")})
    held = [p.name for p in params if p.name in fixed_names]
    if held:
        warn(f"fixed by your options, so not searched: {', '.join(held)}")
        params = [p for p in params if p.name not in fixed_names]
    study, store = open_study(out, storage, seed, prune_startup, prune_warmup)
    optuna = _optuna()
    t_end = time.monotonic() + timeout if timeout else math.inf
    mine = 0
    while time.monotonic() < t_end:
        with _lock(out):
            _fail_orphans(study, store)
            finished, running = _counts(study)
            trial = _ask(study) if finished + running < trials else None
            if trial is not None:
                trial.set_user_attr("host", socket.gethostname())
                trial.set_user_attr("pid", os.getpid())
        if trial is None:
            if running == 0 or finished >= trials:
                break
            time.sleep(2)  # others' trials are running: if one fails, its budget comes back
            continue
        with _heartbeat(store, trial):
            record = _run_trial(trial, params, base, out, warn)
        mine += 1
        if record["state"] == "COMPLETE":
            study.tell(trial, record["value"])
        else:
            study.tell(trial, state=getattr(optuna.trial.TrialState, record["state"]))
        if on_trial:
            on_trial(record)
    return write_results(study, out, mine)


def _run_trial(trial, params: list[Param], base: dict, out: Path, warn) -> dict:
    """Train one trial into STUDY/trial-<k>; (state, value) for the study."""
    from .train import fit

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
    except ConfigError as e:  # a combination the space allows but the data refuses: this trial fails, not the study
        trial.set_user_attr("stopped", f"failed: {e}")
        return record | {"state": "FAIL", "value": None, "why": str(e)}
    value = summary["oof"]["f1"] if "oof" in summary else summary["best"]["val_f1"]
    return record | {"state": "COMPLETE", "value": float(value)}


# -- results -------------------------------------------------------------------------------------------------

def write_results(study, out: Path, mine: int) -> TuneResult:
    """best.toml, trials.csv, the best five trials compared, Optuna's figures, index.html."""
    optuna = _optuna()
    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete = sorted((t for t in trials if t.state == S.COMPLETE), key=lambda t: -t.value)
    names = sorted({k for t in trials for k in t.params})
    rundir.write_csv(out / "trials.csv", ["number", "state", "value", *names, "seconds", "run", "note"],
                     [[t.number, t.state.name, "" if t.value is None else f"{t.value:.6f}",
                       *[t.params.get(k, "") for k in names],
                       f"{t.duration.total_seconds():.1f}" if t.duration else "", t.user_attrs.get("run", ""),
                       t.user_attrs.get("stopped", "")] for t in sorted(trials, key=lambda t: t.number)])
    best = None
    if complete:
        b = complete[0]
        best = {"number": b.number, "value": b.value, "params": b.params, "run": b.user_attrs.get("run")}
        _write_best_toml(out / "best.toml", Path(b.user_attrs["run"]))
    figures = _figures(study, out)
    compared = _compare_best(out, [Path(t.user_attrs["run"]) for t in complete[:5]])
    _index(out, study, trials, best, figures, compared)
    finished = sum(t.state in (S.COMPLETE, S.PRUNED) for t in trials)
    return TuneResult(study, out, best, finished, mine)


def _write_best_toml(path: Path, run: Path) -> None:
    """The best trial's whole configuration as `maskcls train --config` reads it (crops included; give
    --out on the command line)."""
    config = rundir.read_config(run)
    keep = {f.name for f in dataclasses.fields(TrainConfig)} - {"out"}
    lines = [f"# maskcls tune: the best trial ({run.name}); train it with `maskcls train --config {path.name} --out RUN`",
             "[train]"]
    for k in sorted(keep & set(config)):
        v = config[k]
        if v is not None:
            lines.append(f"{k} = {_toml(v)}")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(str(v))


def _figures(study, out: Path) -> list[tuple[str, str]]:
    """Optuna's own history and importance figures (matplotlib), where the study has enough for them."""
    import warnings

    from optuna.visualization import matplotlib as vm

    from .plots import pyplot

    pyplot()  # the Agg backend, set once for the process
    made = []
    for name, fn, caption in (("history.png", vm.plot_optimization_history, "Objective per trial and the best so far."),
                              ("importance.png", vm.plot_param_importances, "How much each parameter mattered "
                                                                           "(fANOVA over the complete trials).")):
        try:
            with warnings.catch_warnings():  # Optuna calls its matplotlib figures experimental
                warnings.filterwarnings("ignore", category=_optuna().exceptions.ExperimentalWarning)
                ax = fn(study)
        except (ValueError, RuntimeError) as e:  # too few complete trials for importances, say
            made.append((None, f"{name}: not drawn ({str(e).splitlines()[0][:120]})"))
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax
        fig.set_size_inches(9, 4.5)
        fig.tight_layout()
        from .plots import save_figure

        save_figure(fig, out / name)
        made.append((name, caption))
    return made


def _compare_best(out: Path, runs: list[Path]) -> bool:
    if len(runs) < 2:
        return False
    from .compare import compare

    compare(runs, out / "compare")
    return True


def _index(out: Path, study, trials, best, figures, compared: bool) -> None:
    import html

    rows = "".join(f"<tr><td>{t.number}</td><td>{t.state.name}</td><td>{'' if t.value is None else f'{t.value:.4f}'}</td>"
                   f"<td>{html.escape(', '.join(f'{k} {v}' for k, v in t.params.items()))}</td></tr>"
                   for t in sorted(trials, key=lambda t: t.number))
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>maskcls tune</title><style>"
             "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}td,th{border:1px solid #ccc;"
             "padding:.3em .6em}table{border-collapse:collapse}img{max-width:100%}</style></head><body>",
             f"<h1>maskcls tune</h1><p>{len(trials)} trials in the study; objective: validation macro F1 "
             "(k-fold: out-of-fold F1). Numbers: <a href='trials.csv'>trials.csv</a>.</p>"]
    if best:
        parts.append(f"<p>Best: trial {best['number']}, F1 {best['value']:.4f}, <a href='best.toml'>best.toml</a> "
                     f"(<code>maskcls train --config best.toml --out RUN</code>).</p>")
    if compared:
        parts.append("<p>The best five trials side by side: <a href='compare/index.html'>compare/index.html</a>.</p>")
    for name, caption in figures:
        parts.append(f"<figure><img src='{name}' alt='{html.escape(caption)}'><figcaption>{html.escape(caption)}"
                     "</figcaption></figure>" if name else f"<p>{html.escape(caption)}</p>")
    parts.append(f"<table><tr><th>trial</th><th>state</th><th>F1</th><th>parameters</th></tr>{rows}</table></body></html>")
    atomic_write_bytes(out / "index.html", "".join(parts).encode())
