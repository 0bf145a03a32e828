"""What a `maskcls tune` study leaves in its folder: best.toml (the best trial's configuration, for
`maskcls train --config`), trials.csv, the best five trials compared, Optuna's figures and index.html."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from preprocess.imageio import atomic_write_bytes

from classify.errors import ConfigError
from classify.inference import rundir
from classify.training.config import TrainConfig


@dataclass
class TuneResult:
    study: object
    out: Path
    best: dict | None         # {"number", "value", "params", "run", "not_learned"} of the best complete trial
    finished: int
    mine: int                 # trials this process ran


def write_results(study, out: Path, mine: int) -> TuneResult:
    """best.toml, trials.csv, the best five trials compared, Optuna's figures, index.html."""
    import optuna

    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete = sorted((t for t in trials if t.state == S.COMPLETE), key=lambda t: -t.value)
    names = sorted({k for t in trials for k in t.params})
    rundir.write_csv(out / "trials.csv", ["number", "state", "value", *names, "seconds", "run", "note", "not_learned"],
                     [[t.number, t.state.name, "" if t.value is None else f"{t.value:.6f}",
                       *[t.params.get(k, "") for k in names],
                       f"{t.duration.total_seconds():.1f}" if t.duration else "", t.user_attrs.get("run", ""),
                       t.user_attrs.get("stopped", ""), " ".join(t.user_attrs.get("not_learned") or [])]
                      for t in sorted(trials, key=lambda t: t.number)])
    best = None
    if complete:
        b = complete[0]
        best = {"number": b.number, "value": b.value, "params": b.params, "run": b.user_attrs.get("run"),
                "not_learned": list(b.user_attrs.get("not_learned") or [])}
        _write_best_toml(out / "best.toml", b.number, study.user_attrs.get("fixed") or {}, b.params)
    figures = _figures(study, out)
    compared = _compare_best(out, [Path(t.user_attrs["run"]) for t in complete[:5]])
    _index(out, study, trials, best, figures, compared)
    finished = sum(t.state in (S.COMPLETE, S.PRUNED) for t in trials)
    return TuneResult(study, out, best, finished, mine)


def best_caution(best: dict | None) -> str | None:
    """What the best trial is when it has not learned a task: no recipe, only the least bad of the trials."""
    if not best or not best.get("not_learned"):
        return None
    tasks = best["not_learned"]
    return (f"the best trial (trial {best['number']}, F1 {best['value']:.4f}) has not learned {', '.join(tasks)}: "
            "on its validation it is no better than always answering the most common label, so best.toml is the least "
            "bad of these trials, not a recipe that works; search with more epochs, from pretrained weights, or on "
            "more people")


def _write_best_toml(path: Path, number: int, fixed: dict, params: dict) -> None:
    """The best trial's whole configuration as `maskcls train --config` reads it: the study's fixed options
    (paths absolute, crops included) and the trial's parameters, both from the study itself, so a machine
    without the trial's folder writes the same file. Give --out on the command line."""
    if not fixed:
        raise ConfigError("the study holds no fixed options (made by an older maskcls): best.toml cannot be written")
    config = fixed | params
    keep = {f.name for f in dataclasses.fields(TrainConfig)} - {"out"}
    lines = [f"# maskcls tune: the best trial (trial-{number}); train it with `maskcls train --config {path.name} --out RUN`",
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


def _importance_caveat(study) -> str:
    """Importances from a handful of trials are mostly noise: say so under the chart."""
    import optuna

    n = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    return (f"; from only {n} complete trials these importances are mostly noise: read them after 20 or more"
            if n < 20 else "")


def _figures(study, out: Path) -> list[tuple[str, str]]:
    """Optuna's own history and importance figures (matplotlib), where the study has enough for them."""
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as vm

    from classify.plots import pyplot

    pyplot()  # the Agg backend, set once for the process
    made = []
    values = {t.value for t in study.get_trials(deepcopy=False) if t.value is not None}
    for name, fn, caption in (("history.png", vm.plot_optimization_history, "Objective per trial and the best so far."),
                              ("importance.png", vm.plot_param_importances, "How much each parameter mattered "
                                                                           "(fANOVA over the complete trials)" +
                                                                           _importance_caveat(study) + ".")):
        if not values:  # Optuna would log "There are no complete trials." on the user's terminal
            made.append((None, f"{name}: not drawn (no trial has completed)"))
            continue
        if name == "importance.png" and len(values) < 2:  # Optuna would warn that every importance is equal
            made.append((None, f"{name}: not drawn (every complete trial scored the same, so no parameter can "
                               "be said to matter more than another)"))
            continue
        try:
            with warnings.catch_warnings(record=True) as said:  # Optuna calls its matplotlib figures experimental
                warnings.simplefilter("always")
                ax = fn(study)
            notes = sorted({str(w.message).splitlines()[0] for w in said if not issubclass(w.category, ExperimentalWarning)})
            if notes:  # Optuna's own caveat about its figure (equal importances, say): under the figure, not stderr
                caption = caption.rstrip(".") + f" (Optuna: {'; '.join(notes)})."
        except (ValueError, RuntimeError) as e:  # too few complete trials for importances, say
            made.append((None, f"{name}: not drawn ({str(e).splitlines()[0][:120]})"))
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax
        fig.set_size_inches(9, 4.5)
        fig.tight_layout()
        from classify.plots import save_figure

        save_figure(fig, out / name)
        made.append((name, caption))
    return made


def _compare_best(out: Path, runs: list[Path]) -> bool:
    runs = [r for r in runs if (r / "summary.json").is_file()]  # trials of other machines have no folder here
    if len(runs) < 2:
        return False
    from classify.study.compare import compare

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
    if study.user_attrs.get("caution"):
        parts.append(f"<p style='color:#b03a2e'>Caution: {html.escape(study.user_attrs['caution'])}; the "
                     "ranking of the trials below may be noise.</p>")
    if best:
        parts.append(f"<p>Best: trial {best['number']}, F1 {best['value']:.4f}, <a href='best.toml'>best.toml</a> "
                     f"(<code>maskcls train --config best.toml --out RUN</code>).</p>")
        said = best_caution(best)
        if said:
            parts.append(f"<p style='color:#b03a2e'>Caution: {html.escape(said)}.</p>")
    if compared:
        parts.append("<p>The best five trials side by side: <a href='compare/index.html'>compare/index.html</a>.</p>")
    for name, caption in figures:
        parts.append(f"<figure><img src='{name}' alt='{html.escape(caption)}'><figcaption>{html.escape(caption)}"
                     "</figcaption></figure>" if name else f"<p>{html.escape(caption)}</p>")
    parts.append(f"<table><tr><th>trial</th><th>state</th><th>F1</th><th>parameters</th></tr>{rows}</table></body></html>")
    atomic_write_bytes(out / "index.html", "".join(parts).encode())
