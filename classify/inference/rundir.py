"""The run folder and the checkpoint payload: the one place that writes and reads them.

RUN/ (one run, or one fold of a k-fold run in RUN/fold<k>/):

| file | what |
| --- | --- |
| config.json | the resolved config (TrainConfig + what `auto` resolved to) |
| split.csv | person_id, split (train / val / dropped / extra) |
| metrics.csv | one row per epoch |
| val_predictions.csv | the best epoch's validation probabilities (8 decimals: for people and reports) |
| val_logits.npz | the best epoch's validation logits, full precision: what the temperature is fitted on |
| val_predictions_last.csv | the last epoch's (the out-of-fold score at the last epoch selects nothing) |
| best.pt, last.pt | checkpoints (last.pt also holds optimizer, scheduler, EMA: for --resume) |
| summary.json | the run's result |
| oof_predictions.csv | a k-fold run folder only: every fold's best-epoch validation predictions |

The best epoch is the first epoch with the highest validation macro F1 (`best_record`). What a checkpoint
says about its model is its card (card.py). Numpy only: the writers that load checkpoints (`swap_in`,
`set_temperature`, `saved_config`) are training's, in training/runs.py.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np

from preprocess import labels as L
from preprocess.imageio import atomic_write_bytes, atomic_writer

from classify.errors import ConfigError

CONFIG, SPLIT, METRICS, SUMMARY = "config.json", "split.csv", "metrics.csv", "summary.json"
VAL_PREDICTIONS, VAL_PREDICTIONS_LAST, OOF_PREDICTIONS = (
    "val_predictions.csv", "val_predictions_last.csv", "oof_predictions.csv")
VAL_LOGITS = "val_logits.npz"
BEST, LAST = "best.pt", "last.pt"


# -- files --------------------------------------------------------------------------------------------

def write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(Path(path), json.dumps(obj, indent=2).encode())


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def write_config(out: Path, config: dict) -> None:
    write_json(Path(out) / CONFIG, config)


def read_config(run: Path) -> dict:
    """config.json of a run folder ({} when it has none)."""
    return read_json(Path(run) / CONFIG)


def read_summary(run: Path) -> dict:
    return read_json(Path(run) / SUMMARY)


def write_summary(out: Path, summary: dict) -> None:
    write_json(Path(out) / SUMMARY, summary)


def write_csv(path: Path, header: list[str], rows) -> None:
    """`header` and `rows` (any iterable: taken as it is written) replace `path` whole; lines end in \\n."""
    with atomic_writer(Path(path), text=True) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_split(path: Path, split: dict[str, str]) -> None:
    write_csv(path, ["person_id", "split"], [[p, split[p]] for p in sorted(split)])


def read_split(run: Path) -> dict[str, str]:
    return {r["person_id"]: r["split"] for r in read_csv(Path(run) / SPLIT)}


def write_metrics(out: Path, history: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in history for k in r))
    write_csv(Path(out) / METRICS, cols, [[_num(r.get(c, "")) for c in cols] for r in history])


def read_metrics(run: Path) -> list[dict]:
    """metrics.csv's rows, as strings (as written); [] when the run has none."""
    path = Path(run) / METRICS
    return read_csv(path) if path.is_file() else []


def _num(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def best_record(history: list[dict]) -> dict:
    """The best epoch's record: the first with the highest validation macro F1."""
    return max(history, key=lambda r: float(r["val_f1"]))


def write_val_predictions(path: Path, image_ids: list[str], probs: np.ndarray, y: np.ndarray) -> None:
    write_csv(path, ["image_id", "label", "pred"] + [f"p{k}" for k in range(L.NUM_CLASSES)],
              [[iid, int(t), int(p.argmax())] + [f"{v:.8f}" for v in p] for iid, p, t in zip(image_ids, probs, y)])


def read_val_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image ids, probabilities N x 18, labels N) of a val_predictions file."""
    rows = read_csv(path)
    probs = np.array([[float(r[f"p{k}"]) for k in range(L.NUM_CLASSES)] for r in rows]).reshape(-1, L.NUM_CLASSES)
    return [r["image_id"] for r in rows], probs, np.array([int(r["label"]) for r in rows], dtype=int)


def write_val_logits(path: Path, image_ids: list[str], logits: np.ndarray, y: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, image_ids=np.array(image_ids, dtype=str), logits=np.asarray(logits, dtype=np.float64),
             labels=np.asarray(y, dtype=np.int64))
    atomic_write_bytes(Path(path), buf.getvalue())


def read_val_logits(run: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image ids, logits N x 18, labels N) of a run's best epoch. A run from before val_logits.npz: the
    log of its CSV probabilities (logits up to a constant per row, so softmax(z / T) is the same wherever
    the 8 decimals did not round a probability to 0)."""
    path = Path(run) / VAL_LOGITS
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return [str(i) for i in f["image_ids"]], f["logits"], f["labels"]
    ids, probs, y = read_val_predictions(Path(run) / VAL_PREDICTIONS)
    return ids, np.log(np.clip(probs, 1e-12, 1.0)), y


# -- k-fold -----------------------------------------------------------------------------------------

def fold_dirs(run: Path) -> list[Path]:
    """The fold folders of a k-fold run folder (`train --fold all`): fold0, fold1, ... in numeric order."""
    return sorted((f for f in Path(run).glob("fold*") if f.name[4:].isdigit() and f.is_dir()),
                  key=lambda f: int(f.name[4:]))


def finished_summary(run: Path, epochs: int) -> dict | None:
    """The summary of a run that needs no more training for `epochs` (all done, or stopped early)."""
    s = read_summary(run)
    return s if s and (s.get("epochs", 0) >= epochs or s.get("stopped_early")) else None


def staging(out: Path) -> Path:
    """Where `train --overwrite` trains the new run before it replaces `out` (one name for every rank)."""
    out = Path(out)
    return out.parent / f".{out.name}.overwrite"


def retired(out: Path) -> Path:
    return Path(out).parent / f".{Path(out).name}.replaced"


def clear(path: Path) -> None:
    import shutil

    if Path(path).exists():
        shutil.rmtree(path)


def recover_swap(out: Path) -> str | None:
    """Finish a swap (`train --overwrite`) killed between its two renames, which left no `out`: roll
    forward to the new run when it is whole (its summary.json is written last), else put the old run back.
    Train calls it before it looks at `out`, and every reader of a run folder before it reads one, so a
    kill never leaves RUN missing for predict, evaluate or serve. Returns what it did, or None."""
    out, old, new = Path(out), retired(out), staging(out)
    if old.exists() and not out.exists():
        if (new / SUMMARY).is_file():
            new.rename(out)
            clear(old)
            return f"{out}: finished an interrupted --overwrite (the new run was whole: it replaced the old one)"
        old.rename(out)
        return f"{out}: undid an interrupted --overwrite (the new run was not finished: the old run is back)"
    if old.exists():
        clear(old)
    return None


def existing_run(out: Path) -> list[str]:
    """What in `out` says it already holds a run."""
    return [n for n in (LAST, BEST, CONFIG, "fold0") if (Path(out) / n).exists()]


# Everything a run (single, k-fold, a tune trial) writes into its folder, and the temporary names of its writes.
RUN_ENTRIES = {CONFIG, SPLIT, METRICS, SUMMARY, VAL_PREDICTIONS, VAL_PREDICTIONS_LAST, OOF_PREDICTIONS, VAL_LOGITS, BEST,
               LAST, "confusion.png", "tensorboard", "pruned.json", "result.json"}
_RUN_ENTRY = re.compile(r"fold\d+|\..+\.[0-9a-f]{8}\.tmp")
_FILE_MANAGERS = {".DS_Store", "Thumbs.db", "desktop.ini"}  # what Finder or Explorer leave in a folder they showed


def foreign_entries(out: Path) -> list[str]:
    """What in the folder `out` no run writes (another program's files, a crops folder, a user's notes).
    `train` neither writes a run among them nor, with --overwrite, replaces the folder they are in: the swap
    replaces the whole folder, so they would go with the old run."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir()
                  if p.name not in RUN_ENTRIES | _FILE_MANAGERS and not _RUN_ENTRY.fullmatch(p.name))
