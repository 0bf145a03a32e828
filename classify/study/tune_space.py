"""The search space of `maskcls tune`: the default one, or a TOML file of `[name]` tables, each checked
against TrainConfig before any trial runs (README "Tune the recipe")."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from classify.training.config import TrainConfig, check_types
from classify.errors import ConfigError

KINDS = ("float", "int", "categorical")

# The default search space: name → spec.
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
