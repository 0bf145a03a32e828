"""`maskcls report`: figures of the data (and of a run), each with its numbers saved as CSV beside it,
and one index.html that shows them with captions.

Data (from the manifest alone): counts per class and per task, the age histogram with the age-group
thresholds, a grid of random crops per class, and a gallery of every photo that did not get a face
of its own (every status but ok, and ok photos where another face was passed over) with its crop and the box
drawn on the original. Run (from RUN's metrics.csv and val_predictions.csv): training curves, the
confusion matrix (counts and row-normalised), per-class F1, and the validation photos the model got
most confidently wrong.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import cv2
import numpy as np

from preprocess import labels as L
from preprocess.imageio import UnreadableImage, atomic_write_bytes, load_rgb, read_crop
from preprocess.manifest import FALLBACKS, STATUS_HELP, read_manifest, read_meta

from classify.inference import rundir
from classify.errors import ConfigError
from classify.data.dataset import person_key
from classify.data.masks import synthesize
from classify.plots import MASK_COLOURS, mask_legend, pyplot, save_figure, short
from classify.study.report_model import model_figures
from classify.inference.rundir import write_csv

GALLERY_PAGE = 24


def report(crops: Path, out: Path, run: Path | None = None, seed: int = 0, per_class: int = 6) -> Path:
    """Write the figures, their CSVs and index.html into `out`; returns the index path.

    >>> report(Path("/tmp/c"), Path("/tmp/report"), run=Path("/tmp/r"))
    """
    crops, out = Path(crops), Path(out)
    if not 1 <= per_class <= 50:
        raise ConfigError(f"--per-class {per_class}: must be in 1..50 (crops shown per class)")
    read_manifest(crops)  # a folder that is no crops folder is refused before anything is written
    old = read_meta(crops).get("config", {}).get("old", L.DEFAULT_OLD)
    val_old = old
    if run is not None:
        run = Path(run)
        folds = rundir.fold_dirs(run)
        missing = [p for p in folds or [run] if not (p / rundir.METRICS).is_file() or not (p / rundir.VAL_PREDICTIONS).is_file()]
        if missing:
            what = (f"a k-fold run whose {', '.join(p.name for p in missing)} has not finished an epoch" if folds else
                    "no finished epoch (no metrics.csv): is it a `maskcls train` run folder?")
            raise ConfigError(f"{run}: {what}")
        cfg = rundir.read_config(folds[0] if folds else run)
        old = cfg.get("old", old)
        val_old = cfg.get("val_old", old)  # validation labels are at this boundary
    rows = read_manifest(crops, old=old)
    out.mkdir(parents=True, exist_ok=True)
    names = L.class_names(old)
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    data = _data_figures(out, crops, rows, names, old, seed, per_class)
    data += _gallery(out, crops, rows)
    preview = _synth_preview(out, crops, rows, names, seed)
    if preview:
        data.append(preview)
    sections.append(("Data", data))
    if run is not None:
        val_names = L.class_names(val_old)
        sections.append(("Model", model_figures(out, crops, run, rows, val_names)))
    return _index(out, crops, run, rows, sections, report_cautions(crops, run) if run is not None else [])


def report_cautions(crops: Path, run: Path) -> list[str]:
    """The run's cautions (`run_cautions`), and a run trained on other crops than the ones reported: its Model
    section is its validation on those other crops, beside this folder's data figures."""
    said = run_cautions(run)
    folds = rundir.fold_dirs(Path(run))
    trained = Path(rundir.read_config(folds[0] if folds else Path(run)).get("crops") or "")
    moved = _same_files(Path(crops), trained, ("manifest.csv", "crops.json"))  # the run's crops, elsewhere
    if trained.resolve() != Path(crops).resolve() and not moved:
        said.append(f"{run} was trained on the crops in {trained}, not on {crops}: its Model section (scores, "
                     f"confusion, curves, calibration) is its validation there, beside {crops}'s data figures; "
                     f"report {trained} with this run, or {crops} with a run trained on it")
    return said


def run_cautions(run: Path) -> list[str]:
    """What the run's model card says to be wary of: a task its validation (or out-of-fold predictions)
    shows it has not learned. The same words as train, compare, predict and pseudo-label say."""
    from classify.inference.card import card_of_run

    run = Path(run)
    if not (run / rundir.BEST).is_file() and not any((f / rundir.BEST).is_file() for f in rundir.fold_dirs(run)):
        return []
    caution = card_of_run(run).caution
    return [caution] if caution else []


def _same_files(a: Path, b: Path, names) -> bool:
    """Whether two folders hold the same bytes under each name (a crops folder moved or copied elsewhere)."""
    try:
        return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    except OSError:
        return False


# -- data figures -------------------------------------------------------------------------------------

def _data_figures(out: Path, crops: Path, rows, names, old: int, seed: int, per_class: int) -> list:
    """The figures the data has labels for; a line saying which need labels it lacks (an eval set has none)."""
    if not any(r["label"] >= 0 for r in rows):
        return [(None, "This crops folder has no labels (an eval set?): the figures of classes, tasks, ages and "
                       "crops per class need labels, so they are not drawn. Below: a sample of its crops."),
                _sample_grid(out, crops, rows, seed)]
    figs = [_class_counts(out, rows, names), _task_counts(out, rows, old)]
    if any(r["age"] >= 0 for r in rows):
        figs.append(_ages(out, rows, old))
    else:
        figs.append((None, "No photo has a known age, so the age histogram is not drawn."))
    return figs + [_crop_grid(out, crops, rows, names, seed, per_class)]


def _sample_grid(out: Path, crops: Path, rows, seed: int, cols: int = 8, max_rows: int = 6):
    """Random crops of an unlabelled folder, each titled with its image id."""
    rng = np.random.default_rng(seed)
    picked = [rows[i] for i in rng.permutation(len(rows))[:cols * max_rows]]
    n_rows = max(1, -(-len(picked) // cols))
    write_csv(out / "sample_grid.csv", ["row", "column", "image_id", "status"],
               [[i // cols, i % cols, r["image_id"], r["status"]] for i, r in enumerate(picked)])
    plt = pyplot()
    fig, axes = plt.subplots(n_rows, cols, figsize=(cols * 1.6, n_rows * 1.85), dpi=100, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(picked):
            ax.imshow(read_crop(crops / picked[i]["crop"]))
            ax.set_title(short(picked[i]["image_id"], 18), fontsize=7)
    fig.suptitle(f"A random sample of the crops ({len(picked)} of {len(rows)}; seed {seed})")
    fig.tight_layout()
    save_figure(fig, out / "sample_grid.png")
    return "sample_grid.png", "Random crops of this unlabelled folder, titled with their image ids."


def _class_counts(out: Path, rows, names):
    counts = np.bincount([r["label"] for r in rows if r["label"] >= 0], minlength=L.NUM_CLASSES)
    people = [len({person_key(r) for r in rows if r["label"] == k}) for k in range(L.NUM_CLASSES)]
    write_csv(out / "class_counts.csv", ["label", "class", "photos", "people"],
               [[k, names[k], int(c), people[k]] for k, c in enumerate(counts)])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12, 5.5), dpi=100)
    colours = [MASK_COLOURS[L.decode(k)[0]] for k in range(L.NUM_CLASSES)]
    bars = ax.bar(range(L.NUM_CLASSES), counts, color=colours)
    mask_legend(ax)
    ax.bar_label(bars, labels=[f"{int(c)}\n({p} p.)" for c, p in zip(counts, people)], fontsize=7, padding=2)
    ax.set_xticks(range(L.NUM_CLASSES), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("photos")
    ax.set_ylim(0, max(int(counts.max()), 1) * 1.3)
    ax.set_title(f"Photos (and people, p.) per class ({int(counts.sum())} labelled photos; colour = mask status)")
    fig.tight_layout()
    save_figure(fig, out / "class_counts.png")
    return "class_counts.png", "Photos per class, as in the manifest (labelled rows of every status). " \
                               "Blue: mask worn, orange: incorrect, green: no mask."


def _task_counts(out: Path, rows, old: int):
    tasks = {"mask": ([r["mask"] for r in rows], L.MASK_NAMES), "gender": ([r["gender"] for r in rows], L.GENDER_NAMES),
             "age group": ([r["age_group"] for r in rows], L.age_names(old))}
    table = []
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), dpi=100)
    for ax, (task, (values, labels)) in zip(axes, tasks.items()):
        counts = np.bincount([v for v in values if v >= 0], minlength=len(labels))
        people = [len({person_key(r) for r, v in zip(rows, values) if v == k}) for k in range(len(labels))]
        table += [[task, labels[k], int(c), people[k]] for k, c in enumerate(counts)]
        bars = ax.bar(labels, counts, color="#4c72b0")
        ax.bar_label(bars, labels=[f"{int(c)} ({p} p.)" for c, p in zip(counts, people)], fontsize=8, padding=2)
        ax.set_ylim(0, max(int(counts.max()), 1) * 1.15)
        ax.set_title(task)
        ax.set_ylabel("photos")
    fig.suptitle("Photos per task")
    fig.tight_layout()
    save_figure(fig, out / "task_counts.png")
    write_csv(out / "task_counts.csv", ["task", "value", "photos", "people"], table)
    return "task_counts.png", "Photos (and people, p.) per value of each task: mask status, gender, age group."


def _ages(out: Path, rows, old: int):
    ages = np.array([r["age"] for r in rows if r["age"] >= 0])
    person_age = {person_key(r): r["age"] for r in rows if r["age"] >= 0}
    edges = np.arange(0, max(int(ages.max()) if len(ages) else 0, old) + 3, 2)
    hist, _ = np.histogram(ages, bins=edges)
    people, _ = np.histogram(np.array(list(person_age.values())), bins=edges)
    write_csv(out / "ages.csv", ["from", "to_excl", "photos", "people"],
               [[int(a), int(b), int(h), int(p)] for a, b, h, p in zip(edges[:-1], edges[1:], hist, people)])
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 5.2), dpi=100, sharex=True, height_ratios=(3, 2))
    ax.bar(edges[:-1], hist, width=2, align="edge", color="#4c72b0", edgecolor="white")
    ax2.bar(edges[:-1], people, width=2, align="edge", color="#dd8452", edgecolor="white")
    ax.set_ylabel("photos")
    ax2.set_ylabel("people")
    for a in (ax, ax2):
        a.set_ylim(0, max(int(a.get_ylim()[1]), 1) * 1.2)
        for t in (L.YOUNG, old):
            a.axvline(t, color="#c44e52", linestyle="--")
    for t, label in ((L.YOUNG, f"{L.YOUNG}: group 1 starts"), (old, f"{old}: group 2 starts")):
        ax.text(t - 0.6, 0.97, label, color="#c44e52", fontsize=9, ha="right", va="top",
                transform=ax.get_xaxis_transform())  # left of its line, at the top: clear of the bars' tops
    ax2.set_xlabel("age (years, 2-year bins)")
    ax.set_title(f"Ages of the photographed people ({len(ages)} photos, {len(person_age)} people)")
    fig.tight_layout()
    save_figure(fig, out / "ages.png")
    return "ages.png", (f"Age histogram of photos (top) and of people (bottom), same bins; dashed lines are the age-group "
                        f"thresholds (30 and {old}).")


def _crop_grid(out: Path, crops: Path, rows, names, seed: int, per_class: int):
    rng = np.random.default_rng(seed)
    tile = 96
    members = [[r for r in rows if r["label"] == k] for k in range(L.NUM_CLASSES)]
    cols = max(1, min(per_class, max(len(m) for m in members)))  # no columns that no class fills
    grid = np.full((L.NUM_CLASSES * tile, cols * tile, 3), 255, np.uint8)
    table = []
    for k in range(L.NUM_CLASSES):
        picked = [members[k][i] for i in rng.permutation(len(members[k]))[:cols]]
        for j, r in enumerate(picked):
            grid[k * tile:(k + 1) * tile, j * tile:(j + 1) * tile] = cv2.resize(read_crop(crops / r["crop"]), (tile, tile),
                                                                                  interpolation=cv2.INTER_AREA)
            table.append([k, names[k], j, r["image_id"], r["status"]])
    write_csv(out / "crops_grid.csv", ["label", "class", "column", "image_id", "status"], table)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(cols * 1.25 + 2.4, L.NUM_CLASSES * 1.25), dpi=100)
    ax.imshow(grid)
    for k, name, j, image_id, _ in table:  # which person each tile is: the id, the start of the folder name
        ax.text(j * tile + 3, (k + 1) * tile - 4, _person_label(image_id), fontsize=7, color="white",
                bbox={"facecolor": "black", "alpha": 0.65, "pad": 1, "edgecolor": "none"})
    ax.set_yticks([k * tile + tile / 2 for k in range(L.NUM_CLASSES)], names, fontsize=8)
    ax.set_xticks([])
    ax.set_title(f"Random crops per class (up to {cols}; seed {seed})")
    fig.tight_layout()
    save_figure(fig, out / "crops_grid.png")
    return "crops_grid.png", ("Random crops of each class, one row per class: what the model is trained on; each "
                              "tile names its person id (image ids in crops_grid.csv).")


def _person_label(image_id: str) -> str:
    """The person id of a competition image id (`000123_female_Asian_45/mask1` → 000123), else its start."""
    folder = image_id.split("/")[0]
    return folder.split("_")[0][:12] if "/" in image_id else folder[:12]


def _synth_preview(out: Path, crops: Path, rows, names, seed: int, n: int = 8):
    """What `train --synth-mask` draws: unmasked crops beside the same crops with a synthetic mask."""
    cands = [r for r in rows if r["mask"] == 2 and r["label"] >= 0 and r.get("landmarks")]
    if not cands:
        return None
    rng = np.random.default_rng(seed)
    picked = [cands[i] for i in rng.permutation(len(cands))[:n]]
    plt = pyplot()
    fig, axes = plt.subplots(2, len(picked), figsize=(1.6 * len(picked) + 0.4, 4.6), dpi=100, squeeze=False)
    table = []
    for j, r in enumerate(picked):
        img = read_crop(crops / r["crop"])
        drawn, label = synthesize(img, r["landmarks"], r["label"], np.random.default_rng([seed, j]))
        for ax, im, title in ((axes[0, j], img, f"{short(r['image_id'], 16)}\n{names[r['label']]}"),
                              (axes[1, j], drawn, f"→ {names[label]}")):
            ax.imshow(im)
            ax.set_title(title, fontsize=6)
            ax.axis("off")
        table.append([r["image_id"], names[r["label"]], names[label]])
    write_csv(out / "synth_masks.csv", ["image_id", "class", "class_with_synthetic_mask"], table)
    fig.suptitle("train --synth-mask: unmasked crops (top) with a mask drawn from their landmarks (bottom)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93), h_pad=2.0)
    save_figure(fig, out / "synth_masks.png")
    return "synth_masks.png", ("Synthetic masks as `train --synth-mask P` draws them (shape, colour and texture vary; "
                               "half below the nose, labelled incorrect, half worn): each unmasked training crop "
                               "gets one with probability P. Classes in synth_masks.csv.")


def _gallery(out: Path, crops: Path, rows):
    bad = [r for r in rows if r["status"] in FALLBACKS or r["reason"]]  # ok + reason: another face passed over
    write_csv(out / "fallbacks.csv", ["image_id", "status", "reason", "score", "x1", "y1", "x2", "y2", "page"],
               [[r["image_id"], r["status"], r["reason"], "" if r.get("score") is None else r["score"], r["x1"], r["y1"],
                 r["x2"], r["y2"], 1 + i // GALLERY_PAGE] for i, r in enumerate(bad)])
    if not bad:
        return [("", "Every photo had its face found by the first detection pass: no fallback gallery.")]
    raw = Path(read_meta(crops).get("raw", ""))
    figures = []
    pages = range(0, len(bad), GALLERY_PAGE)
    for p, start in enumerate(pages, start=1):
        page = bad[start:start + GALLERY_PAGE]
        cols = min(4, len(page))
        nrows = -(-len(page) // cols)
        plt = pyplot()
        fig, axes = plt.subplots(nrows, cols * 2, figsize=(cols * 2 * 1.9, nrows * 2.4), dpi=100, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i, r in enumerate(page):
            a_orig, a_crop = axes[i // cols, 2 * (i % cols)], axes[i // cols, 2 * (i % cols) + 1]
            try:
                img = load_rgb(raw / r["source"]).copy()
                if r["x1"] is not None:
                    x1, y1, x2, y2 = (int(round(r[k])) for k in ("x1", "y1", "x2", "y2"))
                    cv2.rectangle(img, (x1, y1), (x2, y2), (255, 40, 40), max(2, img.shape[1] // 120))
                a_orig.imshow(img)
            except (UnreadableImage, OSError):
                a_orig.text(0.5, 0.5, "no pixels", ha="center", va="center", fontsize=9)
            a_crop.imshow(read_crop(crops / r["crop"]))
            score = f" {r['score']:.2f}" if isinstance(r.get("score"), float) else ""
            a_orig.set_title(f"{r['status']}{score}\n{short(r['image_id'])}", fontsize=7)
            a_crop.set_title("crop used", fontsize=7)
        fig.suptitle(f"Photos without a plain first-pass face: original with the box used (red), and the crop "
                     f"(page {p} of {len(pages)})", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (nrows * 2.4)))  # 0.45 in for the title, whatever the rows
        name = f"fallbacks_{p}.png"
        save_figure(fig, out / name)
        figures.append((name, f"Fallback gallery, page {p}/{len(pages)}: {len(bad)} photos in all. "
                              + "; ".join(f"{k}: {STATUS_HELP[k]}" for k in sorted({r['status'] for r in bad}))
                              + ". ok with a reason: the subject was chosen over another face. Reasons are in "
                              "fallbacks.csv."))
    return figures


# -- outputs ------------------------------------------------------------------------------------------

def _index(out: Path, crops: Path, run, rows, sections, cautions=()) -> Path:
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>maskcls report</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}figcaption{color:#444}</style>",
             "</head><body><h1>maskcls report</h1>",
             f"<p>Crops: <code>{html.escape(str(crops))}</code> ({len(rows)} photos; "
             + ", ".join(f"{html.escape(k)}: {v}" for k, v in sorted(counts.items())) + ")"
             + (f"<br>Run: <code>{html.escape(str(run))}</code>" if run else "") + "</p>"]
    crop_cfg = read_meta(crops).get("config", {})
    if crop_cfg:
        parts.append("<p>Crop settings: " + ", ".join(f"{html.escape(k)} {html.escape(json.dumps(v))}"
                                                      for k, v in crop_cfg.items()
                                                      if k in ("size", "margin", "detect_side", "min_face", "old"))
                     + "</p>")
    parts += [f"<p class='caution' style='color:#b03a2e'>Caution: {html.escape(c)}.</p>" for c in cautions]
    parts += _run_overview(run)
    for title, figs in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        for name, caption in figs:
            if name:
                csv_name = _csv_for(name)
                parts.append(f"<figure><img src='{html.escape(name)}' alt='{html.escape(caption)}'>"
                             f"<figcaption>{html.escape(caption)} Numbers: <a href='{csv_name}'>{csv_name}</a>."
                             "</figcaption></figure>")
            else:
                parts.append(f"<p>{html.escape(caption)}</p>")
    parts.append("</body></html>")
    atomic_write_bytes(out / "index.html", "\n".join(parts).encode("utf-8"))
    return out / "index.html"


def _run_overview(run) -> list[str]:
    """The run's best epoch and its scores per task, and its resolved configuration, as HTML."""
    if run is None or not (Path(run) / "metrics.csv").is_file():
        return []
    m = rundir.read_metrics(run)
    best = rundir.best_record(m)
    cfg = rundir.read_config(run)
    cells = [("18 classes", "val_f1", "val_acc"), ("mask", "val_mask_f1", "val_mask_acc"),
             ("gender", "val_gender_f1", "val_gender_acc"), ("age", "val_age_f1", "val_age_acc")]
    rows = "".join(f"<tr><td>{t}</td><td>{float(best[f]):.4f}</td><td>{float(best[a]):.4f}</td></tr>"
                   for t, f, a in cells if f in best and a in best)
    conf = "".join(f"<tr><td>{html.escape(str(k))}</td><td><code>{html.escape(json.dumps(v))}</code></td></tr>"
                   for k, v in cfg.items())
    return [f"<h2>Run</h2><p>Best epoch {html.escape(best['epoch'])} of {len(m)} (validation at age boundary "
            f"{html.escape(str(cfg.get('val_old', cfg.get('old', L.DEFAULT_OLD))))}):</p>",
            "<table border='1' cellpadding='4' style='border-collapse:collapse'><tr><th>task</th><th>macro F1</th>"
            f"<th>accuracy</th></tr>{rows}</table>",
            f"<details><summary>Resolved configuration (config.json)</summary><table>{conf}</table></details>"]


def _csv_for(png: str) -> str:
    if png.startswith("fallbacks_"):
        return "fallbacks.csv"
    if png in ("confusion_counts.png", "confusion_normalised.png"):
        return "confusion.csv"
    return png.replace(".png", ".csv")
