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

import csv
import html
import json
from pathlib import Path

import cv2
import numpy as np

from preprocess import labels as L
from preprocess.imageio import UnreadableImage, atomic_write_bytes, load_rgb, read_crop
from preprocess.manifest import FALLBACKS, STATUS_HELP, read_manifest, read_meta

from . import rundir
from .errors import ConfigError
from .masks import synthesize
from .metrics import confusion, per_class_f1
from .plots import plot_confusion, pyplot, save_figure

GALLERY_PAGE = 24
MASK_COLOURS = ("#4c72b0", "#dd8452", "#55a868")  # wear, incorrect, not wear: every per-class figure
ABSENT = "#cccccc"


def _mask_legend(ax, absent: bool = False) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=n) for c, n in zip(MASK_COLOURS, ("mask worn", "worn incorrectly", "no mask"))]
    if absent:
        handles.append(Patch(color=ABSENT, label="absent"))
    ax.legend(handles=handles, fontsize=8, loc="upper right", ncol=len(handles), frameon=False)


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
        if not (run / "metrics.csv").is_file():
            hint = (f" It is a k-fold run: give one fold, e.g. {run / 'fold0'}" if (run / "fold0").is_dir() else
                    " Is it a `maskcls train` run folder?")
            raise ConfigError(f"{run} has no metrics.csv.{hint}")
        cfg = rundir.read_config(run)
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
        val = _val(run)  # read once, used by three figures
        val_names = L.class_names(val_old)
        sections.append(("Model", [_curves(out, run), *_confusions(out, val, val_names), _per_class(out, val, val_names),
                                   _calibration(out, run, val), _wrong(out, crops, val, rows, val_names),
                                   _gradcam(out, crops, run, val, rows)]))
    return _index(out, crops, run, rows, sections)


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
    _write_csv(out / "sample_grid.csv", ["row", "column", "image_id", "status"],
               [[i // cols, i % cols, r["image_id"], r["status"]] for i, r in enumerate(picked)])
    plt = pyplot()
    fig, axes = plt.subplots(n_rows, cols, figsize=(cols * 1.6, n_rows * 1.85), dpi=100, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(picked):
            ax.imshow(read_crop(crops / picked[i]["crop"]))
            ax.set_title(_short(picked[i]["image_id"], 18), fontsize=7)
    fig.suptitle(f"A random sample of the crops ({len(picked)} of {len(rows)}; seed {seed})")
    fig.tight_layout()
    save_figure(fig, out / "sample_grid.png")
    return "sample_grid.png", "Random crops of this unlabelled folder, titled with their image ids."


def _class_counts(out: Path, rows, names):
    counts = np.bincount([r["label"] for r in rows if r["label"] >= 0], minlength=L.NUM_CLASSES)
    people = [len({_person(r) for r in rows if r["label"] == k}) for k in range(L.NUM_CLASSES)]
    _write_csv(out / "class_counts.csv", ["label", "class", "photos", "people"],
               [[k, names[k], int(c), people[k]] for k, c in enumerate(counts)])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12, 5.5), dpi=100)
    colours = [MASK_COLOURS[L.decode(k)[0]] for k in range(L.NUM_CLASSES)]
    bars = ax.bar(range(L.NUM_CLASSES), counts, color=colours)
    _mask_legend(ax)
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
        people = [len({_person(r) for r, v in zip(rows, values) if v == k}) for k in range(len(labels))]
        table += [[task, labels[k], int(c), people[k]] for k, c in enumerate(counts)]
        bars = ax.bar(labels, counts, color="#4c72b0")
        ax.bar_label(bars, labels=[f"{int(c)} ({p} p.)" for c, p in zip(counts, people)], fontsize=8, padding=2)
        ax.set_ylim(0, max(int(counts.max()), 1) * 1.15)
        ax.set_title(task)
        ax.set_ylabel("photos")
    fig.suptitle("Photos per task")
    fig.tight_layout()
    save_figure(fig, out / "task_counts.png")
    _write_csv(out / "task_counts.csv", ["task", "value", "photos", "people"], table)
    return "task_counts.png", "Photos (and people, p.) per value of each task: mask status, gender, age group."


def _ages(out: Path, rows, old: int):
    ages = np.array([r["age"] for r in rows if r["age"] >= 0])
    person_age = {_person(r): r["age"] for r in rows if r["age"] >= 0}
    edges = np.arange(0, max(int(ages.max()) if len(ages) else 0, old) + 3, 2)
    hist, _ = np.histogram(ages, bins=edges)
    people, _ = np.histogram(np.array(list(person_age.values())), bins=edges)
    _write_csv(out / "ages.csv", ["from", "to_excl", "photos", "people"],
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
    _write_csv(out / "crops_grid.csv", ["label", "class", "column", "image_id", "status"], table)
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
        for ax, im, title in ((axes[0, j], img, f"{_short(r['image_id'], 16)}\n{names[r['label']]}"),
                              (axes[1, j], drawn, f"→ {names[label]}")):
            ax.imshow(im)
            ax.set_title(title, fontsize=6)
            ax.axis("off")
        table.append([r["image_id"], names[r["label"]], names[label]])
    _write_csv(out / "synth_masks.csv", ["image_id", "class", "class_with_synthetic_mask"], table)
    fig.suptitle("train --synth-mask: unmasked crops (top) with a mask drawn from their landmarks (bottom)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93), h_pad=2.0)
    save_figure(fig, out / "synth_masks.png")
    return "synth_masks.png", ("Synthetic masks as `train --synth-mask P` draws them (shape, colour and texture vary; "
                               "half below the nose, labelled incorrect, half worn): each unmasked training crop "
                               "gets one with probability P. Classes in synth_masks.csv.")


def _gallery(out: Path, crops: Path, rows):
    bad = [r for r in rows if r["status"] in FALLBACKS or r["reason"]]  # ok + reason: another face passed over
    _write_csv(out / "fallbacks.csv", ["image_id", "status", "reason", "score", "x1", "y1", "x2", "y2", "page"],
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
            a_orig.set_title(f"{r['status']}{score}\n{_short(r['image_id'])}", fontsize=7)
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


def _person(r: dict) -> str:
    return r["person_id"] or f"photo:{r['image_id']}"


def _short(s: str, n: int = 28) -> str:
    return s if len(s) <= n else "…" + s[-(n - 1):]


# -- run figures --------------------------------------------------------------------------------------

def _curves(out: Path, run: Path):
    m = rundir.read_metrics(run)
    ep = [int(r["epoch"]) for r in m]
    cols = ["train_loss", "val_loss", "val_acc", "val_f1", "val_mask_f1", "val_gender_f1", "val_age_f1"]
    _write_csv(out / "curves.csv", ["epoch"] + cols, [[r["epoch"]] + [r[c] for c in cols] for r in m])
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4), dpi=100)
    for c in ("train_loss", "val_loss"):
        a.plot(ep, [float(r[c]) for r in m], marker="o", label=c.replace("_", " "))
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.set_title("Loss")
    a.legend()
    styles = [("-", "o", 8), ("--", "s", 7), ("-.", "^", 6), (":", "D", 5), ((0, (5, 1)), "v", 4)]
    for c, (ls, mk, ms) in zip(("val_acc", "val_f1", "val_mask_f1", "val_gender_f1", "val_age_f1"), styles):
        # each its own line style and marker size, so series with equal values stay visible on each other
        b.plot(ep, [float(r[c]) for r in m], linestyle=ls, marker=mk, markersize=ms, fillstyle="none",
               label=c.replace("val_", "").replace("_", " "))
    b.set_xlabel("epoch")
    b.set_ylabel("score")
    b.set_ylim(0, 1.02)
    b.set_title("Validation accuracy and macro F1")
    b.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(min(ep) - 0.5, max(ep) + 0.5)  # one epoch still gets whole-number ticks
    fig.tight_layout()
    save_figure(fig, out / "curves.png")
    return "curves.png", "Training curves: losses (left), validation accuracy and macro F1 of the 18 classes and per task (right)."


def _val(run: Path):
    ids, probs, y = rundir.read_val_predictions(run / rundir.VAL_PREDICTIONS)
    return [{"image_id": i} for i in ids], y, probs


def _confusions(out: Path, val, names):
    _, y, probs = val
    pred = probs.argmax(1)
    cm = confusion(y, pred, L.NUM_CLASSES)
    _write_csv(out / "confusion.csv", ["true \\ predicted"] + names, [[names[i]] + cm[i].tolist() for i in range(len(names))])
    plot_confusion(out / "confusion_counts.png", cm, names, f"validation counts ({len(y)} photos)", blocks=6)
    rown = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    plot_confusion(out / "confusion_normalised.png", np.round(rown * 100).astype(int), names,
                   "validation, % of each true class (rows sum to 100)", blocks=6)
    figures = [("confusion_counts.png", "Confusion matrix of the best epoch's validation predictions (counts); the "
                                        "lines part the mask statuses (wear, incorrect, not wear)."),
               ("confusion_normalised.png", "The same, row-normalised: each true class's photos spread over "
                                            "predictions, in %.")]
    ages = names[0].split("/")[-1], names[1].split("/")[-1], names[2].split("/")[-1]
    for task, yt, pt, labels in zip(L.TASKS, L.task_parts(y), L.task_parts(pred),
                                    (L.MASK_NAMES, L.GENDER_NAMES, ages)):
        tcm = confusion(yt, pt, len(labels))
        _write_csv(out / f"confusion_{task}.csv", ["true \\ predicted"] + list(labels),
                   [[labels[i]] + tcm[i].tolist() for i in range(len(labels))])
        plot_confusion(out / f"confusion_{task}.png", tcm, list(labels), f"{task} ({len(y)} photos)")
        figures.append((f"confusion_{task}.png", f"Confusion matrix of the {task} task alone, decoded from the "
                                                 "18-class predictions."))
    return figures


def _per_class(out: Path, val, names):
    _, y, probs = val
    pred = probs.argmax(1)
    f1 = per_class_f1(y, pred, L.NUM_CLASSES)
    support = np.bincount(y, minlength=L.NUM_CLASSES)
    predicted = np.bincount(pred, minlength=L.NUM_CLASSES)
    absent = (support == 0) & (predicted == 0)  # neither in validation nor predicted: no F1 to speak of
    _write_csv(out / "per_class_f1.csv", ["label", "class", "f1", "photos", "predicted"],
               [[k, names[k], "absent" if absent[k] else f"{f1[k]:.6f}", int(support[k]), int(predicted[k])]
                for k in range(L.NUM_CLASSES)])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12, 5), dpi=100)
    shown = np.where(absent, 0.0, f1)
    bars = ax.bar(range(L.NUM_CLASSES), shown,
                  color=[ABSENT if a else MASK_COLOURS[L.decode(k)[0]] for k, a in enumerate(absent)])
    _mask_legend(ax, absent=bool(absent.any()))
    ax.bar_label(bars, labels=["absent" if a else f"{v:.2f}\n(n={n})" for v, n, a in zip(f1, support, absent)],
                 fontsize=7, padding=2, color="#333333")
    ax.set_xticks(range(L.NUM_CLASSES), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("F1")
    ax.set_title("Validation F1 per class (n = validation photos of the class; absent = no photo and no prediction)")
    fig.tight_layout()
    save_figure(fig, out / "per_class_f1.png")
    return "per_class_f1.png", ("Validation F1 of each class (colour = mask status, as in class_counts.png); n is "
                                "the number of validation photos of that class. "
                                "A class with no validation photo that was never predicted is marked absent, not 0.")


def _wrong(out: Path, crops: Path, val, rows, names, top: int = 16):
    vrows, y, probs = val
    pred = probs.argmax(1)
    conf = probs.max(1)
    wrong = [i for i in np.argsort(-conf, kind="stable") if pred[i] != y[i]][:top]
    by_id = {r["image_id"]: r for r in rows}
    _write_csv(out / "most_confidently_wrong.csv", ["image_id", "true", "predicted", "confidence"],
               [[vrows[i]["image_id"], names[y[i]], names[pred[i]], f"{conf[i]:.6f}"] for i in wrong])
    plt = pyplot()
    cols = 4
    nrows = max(1, -(-len(wrong) // cols))
    height = nrows * 3.9 + 0.7  # 0.7 in for the title, whatever the rows
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * 3.2, height), dpi=100, squeeze=False,
                             gridspec_kw={"hspace": 0.55})
    for ax in axes.flat:
        ax.axis("off")
    for k, i in enumerate(wrong):
        ax = axes[k // cols, k % cols]
        r = by_id.get(vrows[i]["image_id"])
        if r is not None:
            ax.imshow(read_crop(crops / r["crop"]))
        ax.set_title(f"{_short(vrows[i]['image_id'], 34)}\ntrue {names[y[i]]}\npredicted {names[pred[i]]} "
                     f"({conf[i]:.0%})", fontsize=7.5)
    fig.suptitle(f"Validation photos most confidently wrong ({len(wrong)} shown)")
    fig.subplots_adjust(top=1 - 1.25 / height, bottom=0.02, left=0.02, right=0.98)  # title + captions fit above
    save_figure(fig, out / "most_confidently_wrong.png")
    return "most_confidently_wrong.png", "The validation photos the model got wrong with the highest confidence: " \
                                         "look here for label errors and crop failures."


def _calibration(out: Path, run: Path, val):
    """Reliability diagram of the best epoch's validation predictions, before and after the run's
    temperature (summary.json; a fold of a k-fold run: its parent's, fitted out-of-fold)."""
    from .calibration import ECE_BINS, apply_temperature, ece, reliability

    _, y, probs = val
    fitted = rundir.read_summary(run).get("calibration") or rundir.read_summary(run.parent).get("calibration") or {}
    t = float(fitted.get("temperature", 1.0))
    before, after = reliability(probs, y), reliability(apply_temperature(probs, t), y)
    _write_csv(out / "calibration.csv", ["bin", "from", "to", "photos_before", "confidence_before", "accuracy_before",
                                         "photos_after", "confidence_after", "accuracy_after"],
               [[b["bin"], f"{b['from']:.4f}", f"{b['to']:.4f}", b["photos"], _opt(b["confidence"]), _opt(b["accuracy"]),
                 a["photos"], _opt(a["confidence"]), _opt(a["accuracy"])] for b, a in zip(before, after)])
    e0, e1 = ece(probs, y), ece(apply_temperature(probs, t), y)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), dpi=100, sharey=True)
    for ax, bins, title in ((axes[0], before, f"before (ECE {e0:.3f})"), (axes[1], after, f"after T = {t:.3g} (ECE {e1:.3f})")):
        ax.plot([0, 1], [0, 1], "--", color="#999999", label="perfectly calibrated")
        shown = [b for b in bins if b["photos"]]
        ax.bar([b["from"] for b in shown], [b["accuracy"] for b in shown], width=1 / ECE_BINS, align="edge",
               color="#4c72b0", edgecolor="white", label="accuracy of the bin")
        ax.plot([b["from"] + 0.5 / ECE_BINS for b in shown], [b["confidence"] for b in shown], "_", color="#dd8452",
                ms=14, mew=2.5, label="mean confidence of the bin")
        for b in shown:
            ax.text(b["from"] + 0.5 / ECE_BINS, 0.02, str(b["photos"]), ha="center", fontsize=6, color="white")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("top-class probability")
        ax.set_title(title)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Reliability of the validation probabilities (15 bins; photos per bin at the bottom)")
    fig.tight_layout()
    save_figure(fig, out / "calibration.png")
    return "calibration.png", ("Reliability diagram: per confidence bin, how often the top class was right, before "
                               "and after temperature scaling; the expected calibration error (ECE) is the photo-"
                               "weighted gap to the diagonal.")


def _gradcam(out: Path, crops: Path, run: Path, val, rows, per_status: int = 2):
    """Grad-CAM of a few validation photos per mask status (explain.py), when the explain extra is installed."""
    import importlib.util

    if importlib.util.find_spec("pytorch_grad_cam") is None:
        return None, "Grad-CAM figures need the explain extra: pip install 'maskcls[explain]'."
    if not (run / rundir.BEST).is_file():
        return None, f"Grad-CAM: {run} has no best.pt."
    from .checkpoint import load_checkpoint
    from .explain import explain_crops

    vrows, _, _ = val
    by_id = {r["image_id"]: r for r in rows}
    picked = []
    for status in range(3):
        picked += [by_id[v["image_id"]] for v in vrows
                   if v["image_id"] in by_id and by_id[v["image_id"]]["mask"] == status][:per_status]
    if not picked:
        return None, "Grad-CAM: no validation photo with a known mask status."
    explain_crops(load_checkpoint(run / rundir.BEST), crops, picked, out,
                  f"Grad-CAM per task: where {run.name}/best.pt looks ({per_status} validation photos per mask status)")
    return "gradcam.png", ("Each photo's crop and, per task, where the model looked for its prediction (Grad-CAM, "
                           "red: more); gradcam.csv gives each map's share below the nose and in the face.")


def _opt(v) -> str:
    return "" if v is None else f"{v:.4f}"


# -- outputs ------------------------------------------------------------------------------------------

def _write_csv(path: Path, header, rows) -> None:
    import io
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def _index(out: Path, crops: Path, run, rows, sections) -> Path:
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
