"""k-fold training (`train --folds K --fold all`): every fold into RUN/fold<k>, then the out-of-fold score.

Each fold's best epoch is chosen on that fold's own validation people, so the out-of-fold score of the
best epochs is optimistic (it selected on the data it scores). The out-of-fold score at the last
epoch selects nothing; summary.json and the CLI give both.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path

import numpy as np

from classify.inference import rundir
from classify.training import runs
from classify.training.config import RESUMABLE, TrainConfig, resume_config
from classify.training.distributed import Dist
from classify.errors import ConfigError
from classify.inference.calibration import calibrate
from classify.metrics import scores, unlearned_tasks


def fit_folds(cfg: TrainConfig, d: Dist, resume: bool, on_epoch, on_step, warn, fit_one) -> dict:
    """Every fold into RUN/fold<k> (`fit_one`: train.fit_one), then the out-of-fold score. Resumable
    fold by fold: finished folds are kept, the interrupted one continues from its last.pt, the rest start."""
    from classify.data.dataset import person_key, prepare_data, validation_caution

    out = Path(cfg.out)
    data = prepare_data(dataclasses.replace(cfg, fold=0))  # refuses what cannot work (--folds K > people) first
    people = len(data.split)  # every person of the split validates in one fold
    caution = validation_caution(data, True)
    if caution and d.main:
        warn(caution)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        rundir.write_config(out, asdict(cfg))
    folds = []
    for k in range(cfg.folds):
        sub = dataclasses.replace(cfg, fold=k, out=str(out / f"fold{k}"))
        done = rundir.finished_summary(Path(sub.out), cfg.epochs) if resume else None
        if done is not None:
            _check_fold(sub)
        if done is None:
            tag = (lambda rec, k=k: on_epoch(rec | {"fold": k, "folds": cfg.folds})) if on_epoch else None
            again = resume and (Path(sub.out) / rundir.LAST).is_file()
            if again:
                sub = resume_config(sub.out, {k2: getattr(cfg, k2) for k2 in RESUMABLE})
            done = fit_one(sub, d, again, tag, on_step, warn, calibrate=False, in_folds=True)
        folds.append(done)
        d.barrier()
    units = {r["image_id"]: person_key(r) for r in data.rows}
    return write_out_of_fold(out, cfg, folds, [caution] if caution else [], people, units) if d.main else {}


def _check_fold(sub: TrainConfig) -> None:
    """A finished fold is kept by --resume only when it was trained with this run's config (what
    --resume may change aside): a fold of another run is never counted as done."""
    from classify.training.config import changed_keys, config_from

    saved = rundir.read_config(Path(sub.out))
    differ = [k for k in changed_keys(sub, config_from(saved)) if k != "out"] if saved else ["config.json"]
    if differ:
        raise ConfigError(f"--resume: {sub.out} is a finished fold of another run (it differs in "
                          f"{', '.join(differ)}); train with --overwrite to start this run again")


def _oof(out: Path, folds: int, name: str) -> tuple[list[list], np.ndarray, np.ndarray]:
    """(rows fold,image_id,label,pred,p0..p17; labels; predictions) of every fold's `name` predictions."""
    rows, ys, ps = [], [], []
    for k in range(folds):
        ids, probs, y = rundir.read_val_predictions(out / f"fold{k}" / name)
        pred = probs.argmax(1)
        rows += [[k, i, int(t), int(p)] + [f"{v:.8f}" for v in pr] for i, t, p, pr in zip(ids, y, pred, probs)]
        ys.append(y)
        ps.append(pred)
    return rows, np.concatenate(ys), np.concatenate(ps)


def learned_record(y, p, units, on: str) -> dict:
    """What the card and summary record of the tasks the model has not learned (metrics.unlearned_tasks:
    mask per photo, gender and age per person)."""
    return {"on": on, "not_learned": {t: list(ab) for t, ab in unlearned_tasks(y, p, units).items()}}


def write_out_of_fold(out: Path, cfg: TrainConfig, folds: list[dict], warnings: list[str] = (),
                      people: int | None = None, units: dict | None = None) -> dict:
    """The out-of-fold score, temperature and what was not learned, into every fold's card and the summary.
    `units`: each image id's person (person_key), for judging gender and age per person."""
    rows, y, p = _oof(out, cfg.folds, rundir.VAL_PREDICTIONS)
    calibration = None
    if cfg.calibrate:  # one temperature for every fold, fitted on the out-of-fold logits (binary, not the CSV)
        parts = [rundir.read_val_logits(out / f"fold{k}") for k in range(cfg.folds)]
        calibration = calibrate(np.concatenate([z for _, z, _ in parts]), np.concatenate([t for _, _, t in parts]),
                                "out-of-fold logits", people=people)
    validation = learned_record(y, p, [units[r[1]] for r in rows], "out-of-fold predictions")
    for k in range(cfg.folds):
        runs.update_card(out / f"fold{k}", calibration, validation)
    rundir.write_csv(out / rundir.OOF_PREDICTIONS, ["fold", "image_id", "label", "pred"] + [f"p{k}" for k in range(18)],
                     rows)
    have_last = all((out / f"fold{k}" / rundir.VAL_PREDICTIONS_LAST).is_file() for k in range(cfg.folds))
    last = scores(*_oof(out, cfg.folds, rundir.VAL_PREDICTIONS_LAST)[1:]) if have_last else None
    keys = [k for k in folds[0]["best"] if k.startswith("val_") and k != "val_loss"]
    per_fold = np.array([[f["best"][k] for k in keys] for f in folds])
    oof = {"oof": scores(y, p), "oof_last": last, "oof_photos": len(y)} | ({"calibration": calibration} if calibration else {})
    oof |= {"validation": validation}
    return _write_summary(out, cfg, folds, oof, keys, per_fold, list(warnings))


def _write_summary(out: Path, cfg: TrainConfig, folds: list[dict], oof: dict, keys, per_fold, warnings) -> dict:
    summary = {"folds": cfg.folds, **oof,
               "oof_note": "oof: each fold's best epoch, selected on that same fold (optimistic); "
                           "oof_last: every fold's last epoch (selects nothing)",
               "fold_mean": dict(zip(keys, per_fold.mean(0).tolist())),
               "fold_std": dict(zip(keys, per_fold.std(0).tolist())),
               "per_fold": [{"fold": k, "best_epoch": f["best_epoch"], **{key: f["best"][key] for key in keys}}
                            for k, f in enumerate(folds)],
               "val_old": cfg.val_old, "weights": folds[0].get("weights"),
               **({"label_fixes": folds[0]["label_fixes"]} if folds[0].get("label_fixes") else {}),
               **({"groups": folds[0]["groups"]} if folds[0].get("groups") else {}),
               "warnings": warnings + sorted({w for f in folds for w in f.get("warnings", [])} - set(warnings))}
    rundir.write_summary(out, summary)
    return summary
