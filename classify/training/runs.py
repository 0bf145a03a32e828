"""Training's own work on a run folder, which loads checkpoints (torch): the resolved config of a run to
resume, the fitted temperature stored in best.pt's card, and the `--overwrite` swap. The folder's layout
and its torch-free readers are inference/rundir.py's.
"""
from __future__ import annotations

from pathlib import Path

from classify.checkpoint import load_checkpoint, save_checkpoint
from classify.errors import ConfigError
from classify.inference.card import card_of
from classify.inference.rundir import BEST, CONFIG, LAST, clear, read_config, read_json, retired, write_json

def saved_config(out: Path) -> dict:
    """The config of the run in `out`: from its last.pt, or (a k-fold run, or one stopped before its
    first epoch ended) from its config.json."""
    out = Path(out)
    if (out / LAST).is_file():
        return load_checkpoint(out / LAST)["config"]
    if (out / CONFIG).is_file():
        return read_config(out)
    raise ConfigError(f"--resume: {out} holds no run (no last.pt or config.json); nothing to resume")


def update_card(run: Path, calibration: dict | None = None, validation: dict | None = None) -> None:
    """Store what was learned after training in the card of the run's best.pt: a fitted temperature (and the
    calibration it came from), and what validation said of the model (`validation`)."""
    ckpt = load_checkpoint(Path(run) / BEST)
    card = card_of(ckpt)
    if calibration is not None:
        card = card.calibrated(calibration)
    if validation is not None:
        card = card.validated(validation)
    save_checkpoint(Path(run) / BEST, ckpt | {"card": card.to_dict()})


def swap_in(new: Path, out: Path) -> None:
    """Replace the run in `out` by the one trained in `new`: the recorded output folder is set to `out`
    in every config.json and checkpoint, then two renames (the old run is removed last)."""
    new, out = Path(new), Path(out)
    for cfg_file in new.rglob(CONFIG):
        c = read_json(cfg_file)
        write_json(cfg_file, c | {"out": str(out / cfg_file.parent.relative_to(new))})
    for ckpt_file in list(new.rglob("*.pt")):
        ckpt = load_checkpoint(ckpt_file)
        if isinstance(ckpt.get("config"), dict):
            ckpt["config"] = ckpt["config"] | {"out": str(out / ckpt_file.parent.relative_to(new))}
            save_checkpoint(ckpt_file, ckpt)
    old = retired(out)
    clear(old)
    out.rename(old)
    new.rename(out)
    clear(old)
