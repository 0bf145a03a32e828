"""`maskcls compare RUN... --out DIR`: runs side by side, so that a change is judged "under the same
training configuration".

For each run folder: the configuration keys whose values differ between the runs, and the best
validation scores (18-class macro F1 and accuracy, macro F1 per task) of its best epoch; a k-fold run
folder (`--fold all`) gives the mean ± std over its folds (and its out-of-fold F1). Written as
`compare.csv`, `curves.png` (validation macro F1 per epoch, every run overlaid; k-fold: the folds'
mean with a band of ± one std),
`task_f1.png` (per-task F1 bars, runs side by side), each with its CSV, and `index.html`.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocess.imageio import atomic_write_bytes

from classify.inference import rundir
from classify.inference.rundir import fold_dirs
from classify.errors import ConfigError
from classify.metrics import few_people, not_learned_caution
from classify.plots import pyplot, save_figure

SCORES = ("val_f1", "val_acc", "val_mask_f1", "val_gender_f1", "val_age_f1")
# Keys that describe where and how a run ran, not what it learned: never "differences".
IGNORED = {"out", "device", "workers", "device_resolved", "workers_resolved", "world_size", "amp_resolved"}


@dataclass
class RunScores:
    name: str
    path: Path
    config: dict
    mean: dict[str, float]
    std: dict[str, float] | None    # k-fold runs only
    folds: int                      # 0: a single run
    oof_f1: float | None
    curve: list[tuple[int, float]]  # (epoch, val_f1) of the run (k-fold: the folds' mean)
    band: list[float] | None = None  # k-fold: the folds' std per epoch of `curve`
    val_people: int | None = None    # the people its scores come from (k-fold: every person, out of fold)


def _best(run: Path) -> dict[str, float]:
    best = rundir.best_record(rundir.read_metrics(run))
    return {k: float(best[k]) for k in SCORES}


def load_run(path: Path) -> RunScores:
    """The scores of one run folder (single or k-fold), from its config.json and metrics.csv files."""
    path = Path(path)
    config = rundir.read_config(path)
    if not config:
        raise ConfigError(f"{path} is not a `maskcls train` run folder (no config.json)")
    folds = [f for f in fold_dirs(path) if (f / "metrics.csv").is_file()]
    if (path / "metrics.csv").is_file():
        return RunScores(path.name, path, config, _best(path), None, 0, None, _curve(path), None, _val_people(path))
    if not folds:
        raise ConfigError(f"{path} has no metrics.csv and no fold*/metrics.csv: has it finished an epoch?")
    if rundir.read_config(folds[0]):  # fold 0's resolved config (weights, normalisation), as one run's
        config = rundir.read_config(folds[0]) | {"fold": config.get("fold", "all")}
    per = np.array([[_best(f)[k] for k in SCORES] for f in folds])
    oof = rundir.read_summary(path).get("oof", {}).get("f1")
    curves = [dict(_curve(f)) for f in folds]
    epochs = sorted(set.intersection(*(set(c) for c in curves)))  # the epochs every fold reached
    values = np.array([[c[e] for e in epochs] for c in curves])
    return RunScores(path.name, path, config, dict(zip(SCORES, per.mean(0).tolist())),
                     dict(zip(SCORES, per.std(0).tolist())), len(folds), oof,
                     list(zip(epochs, values.mean(0).tolist())), values.std(0).tolist(), _val_people(folds[0], True))


def _val_people(run: Path, every: bool = False) -> int | None:
    """The validation people of a run from its split.csv (`every`: a fold of a k-fold run, whose out-of-fold
    scores cover every person of its split)."""
    if not (run / rundir.SPLIT).is_file():
        return None
    split = rundir.read_split(run)
    return len(split) if every else sum(v == "val" for v in split.values())


def cautions(runs: list[RunScores]) -> list[str]:
    """A caution per run whose scores come from few people (metrics.few_people), and per run whose model has
    not learned a task (metrics.not_learned_caution, as its training said in summary.json)."""
    out = []
    for r in runs:
        said = few_people(r.val_people, f"{r.name}'s " + ("out-of-fold score" if r.folds else "validation")) \
            if r.val_people is not None else None
        if said:
            out.append(said)
        v = rundir.read_summary(r.path).get("validation") or {}
        unlearned = {t: tuple(ab) for t, ab in (v.get("not_learned") or {}).items()}
        said = not_learned_caution(unlearned, f"{r.name}'s {v.get('on', 'validation')}")
        if said:
            out.append(said)
    return out


def _curve(run: Path) -> list[tuple[int, float]]:
    return [(int(r["epoch"]), float(r["val_f1"])) for r in rundir.read_metrics(run)]


# Options that mean something only with another option's value: left out where they do nothing.
APPLIES = {"backbone": lambda c: c.get("model") == "attention",
           "task_weighting": lambda c: c.get("model") == "attention",
           "mix_alpha": lambda c: c.get("mix") in ("cutmix", "mixup"),
           "smoothing": lambda c: c.get("loss") == "smooth", "gamma": lambda c: c.get("loss") == "focal"}


def effective_config(config: dict) -> dict:
    """What a run was trained with: `weights` as resolved (auto → imagenet or none), and without the
    options its other options make idle (a backbone for a model that has none)."""
    c = dict(config)
    if "weights_resolved" in c:
        c["weights"] = c.pop("weights_resolved")
    return {k: v for k, v in c.items() if k not in APPLIES or APPLIES[k](config)}


def differing_keys(runs: list[RunScores]) -> list[str]:
    """Configuration keys whose values (as used) are not the same in every run (where a run lacks a
    key, its value counts as missing)."""
    configs = [effective_config(r.config) for r in runs]
    keys = sorted({k for c in configs for k in c} - IGNORED)
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def value_text(v) -> str:
    """A configuration value as a person writes it: resnet18, 0.001, true, a, b; '' where unset."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ", ".join(value_text(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k} {value_text(x)}" for k, x in v.items())
    return str(v)


def config_cell(r: RunScores, k: str) -> str:
    return value_text(effective_config(r.config).get(k))


def _unique_names(runs: list[RunScores]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        if r.name in seen:
            seen[r.name] += 1
            r.name = f"{r.path.parent.name}/{r.name}"
        seen.setdefault(r.name, 1)


def cell(r: RunScores, k: str) -> str:
    return f"{r.mean[k]:.4f}" if r.std is None else f"{r.mean[k]:.4f} ± {r.std[k]:.4f}"


def compare(paths: list[Path], out: Path) -> tuple[list[RunScores], list[str], Path]:
    """(runs, the configuration keys that differ, index.html) for two or more run folders."""
    if len(paths) < 2:
        raise ConfigError("give two or more run folders to compare")
    runs = [load_run(p) for p in paths]  # every folder is checked before anything is written
    _unique_names(runs)
    keys = differing_keys(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = ["run", "folds", "val_people"] + keys + [f"{k}_mean" for k in SCORES] + [f"{k}_std" for k in SCORES] + ["oof_f1"]
    lines = [header] + [[r.name, r.folds, "" if r.val_people is None else r.val_people] + [config_cell(r, k) for k in keys]
                        + [f"{r.mean[k]:.6f}" for k in SCORES]
                        + [f"{r.std[k]:.6f}" if r.std else "" for k in SCORES]
                        + [f"{r.oof_f1:.6f}" if r.oof_f1 is not None else ""] for r in runs]
    rundir.write_csv(out / "compare.csv", lines[0], lines[1:])
    _curves(out, runs)
    _task_bars(out, runs)
    index = _index(out, runs, keys)
    return runs, keys, index


def _curves(out: Path, runs: list[RunScores]) -> None:
    rundir.write_csv(out / "curves.csv", ["run", "epoch", "val_f1", "val_f1_std"],
                     [[r.name, e, f"{v:.6f}", f"{r.band[i]:.6f}" if r.band is not None else ""]
                      for r in runs for i, (e, v) in enumerate(r.curve)])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    styles = ["-", "--", "-.", ":"]
    for i, r in enumerate(runs):
        line, = ax.plot(*zip(*r.curve), styles[i % 4], marker="os^dv"[i % 5],
                        label=r.name + (f" (mean of {r.folds} folds ± std)" if r.folds else ""))
        if r.band is not None:
            e, m = np.array(r.curve).T
            ax.fill_between(e, m - np.array(r.band), m + np.array(r.band), color=line.get_color(), alpha=0.15)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation macro F1 (18 classes)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Validation macro F1 per epoch")
    fig.tight_layout()
    save_figure(fig, out / "curves.png")


def _task_bars(out: Path, runs: list[RunScores]) -> None:
    tasks = [("val_f1", "18 classes"), ("val_mask_f1", "mask"), ("val_gender_f1", "gender"), ("val_age_f1", "age")]
    rundir.write_csv(out / "task_f1.csv", ["run", "task", "f1_mean", "f1_std"],
                     [[r.name, t, f"{r.mean[k]:.6f}", f"{r.std[k]:.6f}" if r.std else ""] for r in runs for k, t in tasks])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    width = 0.8 / len(runs)
    x = np.arange(len(tasks))
    for i, r in enumerate(runs):
        vals = [r.mean[k] for k, _ in tasks]
        err = [r.std[k] for k, _ in tasks] if r.std else None
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, vals, width, yerr=err, capsize=3, label=r.name)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [t for _, t in tasks])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("best validation macro F1")
    ax.set_title("Macro F1 per task at each run's best epoch (k-fold: mean ± std over folds)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    save_figure(fig, out / "task_f1.png")


def _index(out: Path, runs: list[RunScores], keys: list[str]) -> Path:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["run", "people"] + keys + ["F1", "accuracy", "mask F1", "gender F1",
                                                                           "age F1", "out-of-fold F1"])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in
                                    [r.name + (f" ({r.folds} folds)" if r.folds else ""),
                                     "?" if r.val_people is None else r.val_people]
                                    + [config_cell(r, k) for k in keys]
                                    + [cell(r, k) for k in SCORES]
                                    + [f"{r.oof_f1:.4f}" if r.oof_f1 is not None else ""]) + "</tr>" for r in runs)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>maskcls compare</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}td,th{border:1px solid #ccc;"
            "padding:.3em .6em}table{border-collapse:collapse}img{max-width:100%;border:1px solid #ddd}"
            ".caution{color:#b03a2e}</style>"
            "</head><body><h1>maskcls compare</h1>"
            f"<p>{len(runs)} runs; configuration keys that differ: {html.escape(', '.join(keys) or 'none')}.</p>"
            + "".join(f"<p class='caution'>Caution: {html.escape(c)}.</p>" for c in cautions(runs))
            + f"<table><tr>{head}</tr>{body}</table><p>Numbers: <a href='compare.csv'>compare.csv</a>.</p>"
            "<figure><img src='curves.png' alt='validation F1 per epoch'><figcaption>Validation macro F1 per "
            "epoch (a k-fold run: the folds' mean, the band ± one std). Numbers: <a href='curves.csv'>curves.csv</a>."
            "</figcaption></figure>"
            "<figure><img src='task_f1.png' alt='F1 per task'><figcaption>Macro F1 per task. Numbers: "
            "<a href='task_f1.csv'>task_f1.csv</a>.</figcaption></figure></body></html>")
    atomic_write_bytes(out / "index.html", page.encode("utf-8"))
    return out / "index.html"
