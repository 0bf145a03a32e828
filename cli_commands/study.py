"""The commands that look at runs: report (figures of a crops folder and a run), compare (runs side by
side) and tune (an Optuna study over the training recipe)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import check_outputs, console, require_extra, user_errors, warning


@user_errors
def report(
    crops: Path = typer.Argument(..., metavar="CROPS", help="Crops folder written by `maskcls crop`."),
    run: Optional[Path] = typer.Argument(None, metavar="RUN", help="Optional run folder written by `maskcls train`."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the PNG figures, their CSVs and index.html."),
    seed: int = typer.Option(0, help="Seed of the random crops shown per class."),
    per_class: int = typer.Option(6, help="Crops shown per class in the grid."),
):
    """Figures of the data (and of a run) with their numbers as CSV, and one index.html."""
    check_outputs(folders={"--out": out})
    from classify.study.report import report as run_report, report_cautions

    index = run_report(crops, out, run=run, seed=seed, per_class=per_class)
    for c in report_cautions(crops, run) if run is not None else []:
        warning(c)
    console.print(f"report: {escape(str(index))}", highlight=False)


@user_errors
def compare_runs(
    runs: list[Path] = typer.Argument(..., metavar="RUN...", help="Two or more run folders (a k-fold run folder: mean ± std over folds)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for compare.csv, the figures and index.html."),
):
    """Runs side by side: the configuration keys that differ, best scores per task, curves and bars."""
    check_outputs(folders={"--out": out})
    from classify.study.compare import SCORES, cautions, cell, compare, config_cell

    results, keys, index = compare(runs, out)
    names = [r.name + (f" ({r.folds} folds)" if r.folds else "") for r in results]
    rows = [("people", ["?" if r.val_people is None else str(r.val_people) for r in results])]
    rows += [(k, [config_cell(r, k) for r in results]) for k in keys]
    rows += [(label, [cell(r, k) for r in results]) for label, k in zip(("F1", "acc", "mask F1", "gender F1", "age F1"), SCORES)]
    rows.append(("OOF F1", [f"{r.oof_f1:.4f}" if r.oof_f1 is not None else "" for r in results]))
    # One column per run, one row per key: a few runs stay readable at 80 columns; cells wrap, never "…".
    t = Table(title=f"{len(results)} runs; configuration keys that differ: {escape(', '.join(keys) or 'none')}",
              title_justify="left")
    t.add_column("", overflow="fold")
    for n in names:
        t.add_column(escape(n), justify="right", overflow="fold")
    for label, cells in rows:
        t.add_row(escape(label), *map(escape, cells))
    console.print(t)
    for caution in cautions(results):
        warning(caution)
    console.print(f"compare: {escape(str(index))}", highlight=False)


@user_errors
def tune(
    ctx: typer.Context,
    crops: Path = typer.Argument(..., metavar="CROPS", help="Crops folder written by `maskcls crop`."),
    out: Path = typer.Option(..., "--out", "-o", help="Study folder: trial-<k>/ run folders, study.db, results."),
    trials: int = typer.Option(20, help="Finished trials wanted in the study, all processes together."),
    storage: Optional[str] = typer.Option(None, envvar="MASKCLS_TUNE_STORAGE", help="An RDB URL Optuna accepts (postgresql://...; or the environment variable MASKCLS_TUNE_STORAGE, which keeps a password out of argv) to share the "
                                                     "study between machines (default: sqlite STUDY/study.db)."),
    space: Optional[Path] = typer.Option(None, help="TOML search space replacing the default (README)."),
    timeout: Optional[float] = typer.Option(None, help="Stop starting trials after this many seconds."),
    sampler_seed: int = typer.Option(0, help="Seed of the TPE sampler."),
    prune_startup: int = typer.Option(5, help="Trials finished before MedianPruner prunes."),
    prune_warmup: int = typer.Option(1, help="Epochs a trial trains before it can be pruned."),
    config: Optional[Path] = typer.Option(None, help="TOML file of fixed train options."),
):
    """Search the training recipe with Optuna; any `train` option given here is fixed for every trial."""
    check_outputs(folders={"--out": out})
    import dataclasses

    require_extra("tune", "maskcls tune")
    from classify.training.config import load_config
    from classify.errors import ConfigError
    from classify.study.tune import tune as run_tune

    root = ctx.find_root()  # the maskcls group: tune parses its extra options as train parses them
    train_cmd = root.command.get_command(root, "train")
    try:
        given = train_cmd.make_context("train", list(ctx.args), resilient_parsing=False).params
    except typer.TyperException as e:  # typer's usage errors (it carries its own click)
        raise ConfigError(f"{e.format_message()} (tune takes every `maskcls train` option as a fixed value)") from None
    given = {k: v for k, v in given.items() if k not in ("crops", "out", "config", "resume", "overwrite")}
    cfg = load_config(given | {"crops": crops, "out": out / "trial-0"}, config)
    explicit = {k for k, v in given.items() if v is not None and not (k == "extra" and not v)}
    if config:  # load_config has read it already: it is valid TOML
        import tomllib
        values = tomllib.loads(config.read_text())
        explicit |= set(values.get("train", values))
    fixed = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}

    def show(rec):
        value = f"F1 {rec['value']:.4f}" if rec["value"] is not None else rec["state"].lower()
        if rec.get("not_learned"):
            value += f" (has not learned {', '.join(rec['not_learned'])})"
        console.print(f"trial {rec['number']}: {value}  " + escape(_params(rec["params"])), highlight=False)

    res = run_tune(fixed, out, trials, storage, space, timeout, sampler_seed, prune_startup, prune_warmup,
                   on_trial=show, warn=warning, fixed_names=explicit)
    _tune_table(res)


def _params(params: dict) -> str:
    """A trial's parameters as a person reads them: 4 significant digits (0.0003162, not 0.00031622776601683794)."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def _tune_table(res) -> None:
    optuna_trials = [t for t in res.study.get_trials(deepcopy=False) if t.value is not None]
    best = sorted(optuna_trials, key=lambda t: -t.value)[:10]
    t = Table(title=f"{res.finished} finished trials ({res.mine} by this process); best first", title_justify="left")
    for c in ("trial", "F1", "parameters"):
        t.add_column(c, overflow="fold")
    for tr in best:
        t.add_row(str(tr.number), f"{tr.value:.4f}", escape(_params(tr.params)))
    console.print(t)
    if res.best:
        console.print(f"best: trial {res.best['number']} (F1 {res.best['value']:.4f}); train it with "
                      f"`maskcls train --config {escape(str(res.out / 'best.toml'))} --out RUN`", highlight=False)
        from classify.study.tune_results import best_caution

        said = best_caution(res.best)
        if said:
            warning(said)
    console.print(f"study: {escape(str(res.out / 'index.html'))}", highlight=False)


@user_errors
def audit(
    run: Path = typer.Argument(..., metavar="RUN", help="A k-fold run folder (`train --folds K --fold all`): its "
                                                        "out-of-fold predictions judge every photo."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for suspects.csv, label_fixes.csv and index.html."),
    min_score: Optional[float] = typer.Option(None, help="One threshold for every kind of suspect in label_fixes.csv "
                                                         "(a score: how likely the given label is wrong), instead of "
                                                         "the per-kind defaults measured >= 90% right (README).",
                                              show_default=False),
    epoch: str = typer.Option("best", help="Judge by each fold's best or last epoch's out-of-fold predictions."),
    crops: Optional[Path] = typer.Option(None, help="The run's crops folder, where it has moved (default: the one "
                                                    "in the run's config)."),
):
    """The training labels most likely wrong (confident learning, cleanlab), with a page to review them."""
    check_outputs(folders={"--out": out})
    require_extra("audit", "maskcls audit")
    from classify.study.audit import audit as run_audit

    res = run_audit(run, out, min_score, crops, epoch)
    by = Counter(s.field for s in res.suspects)
    t = Table(title=f"{len(res.suspects)} suspects among {res.photos} photos of {res.people} people "
                    f"({', '.join(f'{k} {by[k]}' for k in ('mask', 'gender', 'age')) or 'none'}); the first 10",
              title_justify="left")
    for c in ("#", "id", "field", "given", "suggested", "score"):
        t.add_column(c, overflow="fold")
    for k, s in enumerate(res.suspects[:10], start=1):
        t.add_row(str(k), escape(s.id), s.field, escape(s.given), escape(s.suggested), f"{s.score:.3f}")
    console.print(t)
    for caution in res.cautions + res.not_judged:
        warning(caution)
    which = f"with score >= {min_score}" if min_score is not None else "of the kinds and scores measured >= 90% right"
    if res.carried_from:
        console.print(f"The run trained with --label-fixes {escape(res.carried_from)}: label_fixes.csv keeps "
                      f"{res.carried} of its rows (the others replaced by new fixes), so it applies to the crops "
                      f"as cropped; train with it alone.", highlight=False)
    console.print(f"{res.fixes} fix(es) {which} in {escape(str(res.out / 'label_fixes.csv'))}; review "
                  f"them on {escape(str(res.out / 'index.html'))}, then `maskcls train CROPS --label-fixes "
                  f"{escape(str(res.out / 'label_fixes.csv'))} ...`", highlight=False)
