"""The run's figures of `maskcls report`: training curves, the confusion matrices (18 classes and per
task), per-class F1, the reliability diagram before and after calibration, the validation photos most
confidently wrong, and Grad-CAM per task (with the explain extra). Each figure's numbers are written
beside it as CSV.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocess import labels as L
from preprocess.imageio import read_crop

from classify.inference import rundir
from classify.metrics import confusion, per_class_f1
from classify.plots import ABSENT, MASK_COLOURS, mask_legend, plot_confusion, pyplot, save_figure, short
from classify.inference.rundir import write_csv


def model_figures(out: Path, crops: Path, run: Path, rows: list[dict], names: list[str]) -> list[tuple]:
    """Every run figure, as (png, caption); the validation predictions are read once. A k-fold run folder:
    its folds' validation predictions together (every person once, out of fold), each fold's curves."""
    parts = rundir.fold_dirs(run) or [run]
    val = _val(parts)
    return [_curves(out, parts), *_confusions(out, val, names), _per_class(out, val, names),
            _calibration(out, parts, val), _wrong(out, crops, val, rows, names), _gradcam(out, crops, parts[0], val, rows)]


def _curves(out: Path, parts: list[Path]):
    """Losses and validation scores per epoch (a k-fold run: the mean over its folds at each epoch)."""
    per = [rundir.read_metrics(p) for p in parts]
    n = min(len(m) for m in per)
    cols = ["train_loss", "val_loss", "val_acc", "val_f1", "val_mask_f1", "val_gender_f1", "val_age_f1"]
    m = [{"epoch": per[0][e]["epoch"]} | {c: str(np.mean([float(f[e][c]) for f in per])) for c in cols} for e in range(n)]
    ep = [int(r["epoch"]) for r in m]
    write_csv(out / "curves.csv", ["epoch"] + cols, [[r["epoch"]] + [r[c] for c in cols] for r in m])
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
    b.set_title("Validation accuracy and macro F1" + (f" (mean of {len(parts)} folds)" if len(parts) > 1 else ""))
    b.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(min(ep) - 0.5, max(ep) + 0.5)  # one epoch still gets whole-number ticks
    fig.tight_layout()
    save_figure(fig, out / "curves.png")
    return "curves.png", "Training curves: losses (left), validation accuracy and macro F1 of the 18 classes and per task (right)."


def _val(parts: list[Path]):
    got = [rundir.read_val_predictions(p / rundir.VAL_PREDICTIONS) for p in parts]
    return ([{"image_id": i} for ids, _, _ in got for i in ids], np.concatenate([y for _, _, y in got]),
            np.concatenate([probs for _, probs, _ in got]))


def _confusions(out: Path, val, names):
    _, y, probs = val
    pred = probs.argmax(1)
    cm = confusion(y, pred, L.NUM_CLASSES)
    write_csv(out / "confusion.csv", ["true \\ predicted"] + names, [[names[i]] + cm[i].tolist() for i in range(len(names))])
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
        write_csv(out / f"confusion_{task}.csv", ["true \\ predicted"] + list(labels),
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
    write_csv(out / "per_class_f1.csv", ["label", "class", "f1", "photos", "predicted"],
               [[k, names[k], "absent" if absent[k] else f"{f1[k]:.6f}", int(support[k]), int(predicted[k])]
                for k in range(L.NUM_CLASSES)])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12, 5), dpi=100)
    shown = np.where(absent, 0.0, f1)
    bars = ax.bar(range(L.NUM_CLASSES), shown,
                  color=[ABSENT if a else MASK_COLOURS[L.decode(k)[0]] for k, a in enumerate(absent)])
    mask_legend(ax, absent=bool(absent.any()))
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
    write_csv(out / "most_confidently_wrong.csv", ["image_id", "true", "predicted", "confidence"],
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
        ax.set_title(f"{short(vrows[i]['image_id'], 34)}\ntrue {names[y[i]]}\npredicted {names[pred[i]]} "
                     f"({conf[i]:.0%})", fontsize=7.5)
    fig.suptitle(f"Validation photos most confidently wrong ({len(wrong)} shown)")
    fig.subplots_adjust(top=1 - 1.25 / height, bottom=0.02, left=0.02, right=0.98)  # title + captions fit above
    save_figure(fig, out / "most_confidently_wrong.png")
    return "most_confidently_wrong.png", "The validation photos the model got wrong with the highest confidence: " \
                                         "look here for label errors and crop failures."


def _calibration(out: Path, parts: list[Path], val):
    """Reliability diagram of the best epoch's validation predictions, before and after the temperature
    predict applies: the model card's (a k-fold run's folds share the one fitted out of fold)."""
    from classify.inference.calibration import ECE_BINS, apply_temperature, ece, reliability
    from classify.inference.card import card_of_run

    got = [rundir.read_val_logits(p) for p in parts]  # the logits T was fitted on, in the form predict applies it
    logits, y = np.concatenate([z for _, z, _ in got]), np.concatenate([t for _, _, t in got])
    t = card_of_run(parts[0]).temperature if (parts[0] / rundir.BEST).is_file() else 1.0
    probs = apply_temperature(logits)
    before, after = reliability(probs, y), reliability(apply_temperature(logits, t), y)
    write_csv(out / "calibration.csv", ["bin", "from", "to", "photos_before", "confidence_before", "accuracy_before",
                                         "photos_after", "confidence_after", "accuracy_after"],
               [[b["bin"], f"{b['from']:.4f}", f"{b['to']:.4f}", b["photos"], _opt(b["confidence"]), _opt(b["accuracy"]),
                 a["photos"], _opt(a["confidence"]), _opt(a["accuracy"])] for b, a in zip(before, after)])
    e0, e1 = ece(probs, y), ece(apply_temperature(logits, t), y)
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
    from classify.checkpoint import load_checkpoint
    from classify.study.explain import explain_crops

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
