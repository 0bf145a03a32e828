"""The training configuration: `TrainConfig` (a frozen dataclass passed down, never a global), its
checks, how it is loaded (defaults < TOML file < command line) and what `--resume` may change.

Every value is checked for its type and range before any work: `epochs = "10"` in a TOML file is
one error line naming the key, not a traceback from deep in the loop.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from preprocess import labels as L

from classify.inference.engine import AMP_MODES
from classify.errors import ConfigError
from classify.training.losses import LOSSES
from classify.models.nets import check_model
from classify.data.transforms import PRESETS

MIXES = ("none", "cutmix", "mixup", "vcutmix", "vcutmix-class")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "onecycle")


@dataclass(frozen=True)
class TrainConfig:
    crops: str
    out: str
    model: str = "resnet18"           # any torchvision classification model, timm/<name>, or attention
    backbone: str = "resnet18"        # the attention model's backbone (same names)
    dropout: float = 0.2              # before the head (and in the attention model's task branches)
    epochs: int = 10
    batch_size: int = 32              # per process (torchrun: global batch = batch_size x processes)
    accum: int = 1                    # gradient accumulation: one optimizer step every `accum` batches
    lr: float = 1e-3                  # peak learning rate of the head (and of a randomly initialised backbone)
    backbone_lr: float = 0.1          # a pretrained backbone's learning rate, as a fraction of --lr
    weight_decay: float = 1e-4
    optimizer: str = "adamw"          # adam | adamw | sgd
    scheduler: str = "cosine"         # none | cosine | onecycle (all a function of the optimizer step)
    warmup: float = 1.0               # epochs of linear warmup from 1% of the peak (cosine and none)
    clip_grad: float = 0.0            # clip the gradients' global norm to this (0: off)
    ema: float = 0.0                  # decay of an exponential moving average of the weights (0: off)
    patience: int = 0                 # stop after this many epochs without a better validation F1 (0: off)
    img_size: int = 224
    preset: str = "base"              # base | strong | none
    mix: str = "none"                 # none | cutmix | mixup | vcutmix | vcutmix-class (see mixing.py)
    mix_alpha: float = 1.0
    synth_mask: float = 0.0           # chance that an unmasked training crop gets a drawn mask (classify/data/masks.py)
    extra: tuple[str, ...] = ()       # crops folders added to training only (e.g. `maskcls pseudo-label`'s)
    loss: str = "wce"                 # wce | ce | smooth | focal | f1 (wce: chosen by bench/finetune.py)
    smoothing: float = 0.1
    gamma: float = 2.0
    task_weighting: str = "uncertainty"  # attention model: fixed | uncertainty
    val_ratio: float = 0.2
    folds: int = 0
    fold: int | str = 0               # 0..folds-1, or "all": every fold into RUN/fold<k>
    seed: int = 42
    old: int = L.DEFAULT_OLD          # the training labels' age boundary
    val_old: int = L.DEFAULT_OLD      # the boundary the split is stratified at, and validation scores at
    drop_ages_near: int = 0           # leave out training people within this many years of a boundary
    freeze_backbone: bool = False
    weights: str = "auto"             # auto | imagenet | none | PATH | a torchvision weights set (IMAGENET1K_V1)
    device: str = "auto"
    workers: int | None = None        # DataLoader workers per process (None: from the machine's cores)
    amp: str = "auto"                 # auto | bf16 | fp16 | off (CUDA only)
    compile: bool = False             # torch.compile the model
    sampler: str = "none"             # none | weighted (inverse class frequency)
    label_fixes: str | None = None
    groups: str | None = None         # CSV person_id,group: people split as one unit (the same human twice)
    calibrate: bool = True            # fit a temperature on the validation predictions after training

    def check(self) -> None:
        """Every value that cannot work is refused here, before any work, naming its option."""
        check_types(dataclasses.asdict(self), "--")
        choices = {"optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "preset": PRESETS, "mix": MIXES,
                   "loss": LOSSES, "task_weighting": ("fixed", "uncertainty"), "sampler": ("none", "weighted"),
                   "amp": AMP_MODES}
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise ConfigError(f"--{k.replace('_', '-')} {getattr(self, k)!r}: choose one of {', '.join(allowed)}")
        check_model(self.model, self.backbone)
        for name, ok, allowed in self._ranges():
            if not ok:
                raise ConfigError(f"--{name} {getattr(self, name.replace('-', '_'))}: must be {allowed}")
        for extra in self.extra:
            if not (Path(extra) / "manifest.csv").is_file():
                raise ConfigError(f"--extra {extra}: not a crops folder (no manifest.csv); give a folder written by "
                                  "`maskcls crop` or `maskcls pseudo-label`")
        if self.groups and not Path(self.groups).is_file():
            what = "a folder, not a file" if Path(self.groups).is_dir() else "no such file"
            raise ConfigError(f"--groups {self.groups}: {what} (give a CSV person_id,group)")
        if self.fold == "all":
            if self.folds < 2:
                raise ConfigError("--fold all needs --folds K (K >= 2)")
        elif not isinstance(self.fold, int) or (self.folds and not 0 <= self.fold < self.folds):
            raise ConfigError(f"--fold {self.fold!r}: must be all or in 0..{max(self.folds - 1, 0)}")

    def _ranges(self):
        return [("epochs", self.epochs >= 1, ">= 1"), ("batch-size", self.batch_size >= 1, ">= 1"),
                ("accum", self.accum >= 1, ">= 1"), ("img-size", self.img_size >= 32, ">= 32"),
                ("lr", self.lr > 0, "> 0"), ("weight-decay", self.weight_decay >= 0, ">= 0"),
                ("backbone-lr", 0 <= self.backbone_lr <= 10, "between 0 and 10 (a fraction of --lr)"),
                ("warmup", self.warmup >= 0, ">= 0"),
                ("clip-grad", self.clip_grad >= 0, ">= 0 (0: off)"), ("ema", 0 <= self.ema < 1, "in [0, 1)"),
                ("patience", self.patience >= 0, ">= 0 (0: off)"), ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                ("mix-alpha", self.mix_alpha > 0, "> 0"), ("smoothing", 0 <= self.smoothing < 1, "in [0, 1)"),
                ("synth-mask", 0 <= self.synth_mask <= 1, "in [0, 1] (a probability)"),
                ("gamma", self.gamma >= 0, ">= 0"), ("val-ratio", 0 < self.val_ratio < 1, "between 0 and 1"),
                ("folds", self.folds == 0 or self.folds >= 2, "0 (use --val-ratio) or >= 2"),
                ("old", L.YOUNG < self.old <= 120, f"in {L.YOUNG + 1}..120"),
                ("val-old", L.YOUNG < self.val_old <= 120, f"in {L.YOUNG + 1}..120"),
                ("drop-ages-near", 0 <= self.drop_ages_near <= 10, "in 0..10"),
                ("workers", self.workers is None or self.workers >= 0, ">= 0")]


def _kinds() -> dict[str, tuple[type, ...]]:
    """Each field's accepted Python types (None included where the field allows it)."""
    kinds = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds[name] = tuple(typing.get_origin(a) or a for a in (typing.get_args(hint) if union else (hint,)))
    return kinds


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               tuple: "a list of folders", type(None): "unset"}


def check_types(values: dict, prefix: str) -> None:
    """Refuse a value of the wrong type (a string for a number, a number for a name, ...) naming the key."""
    kinds = _kinds()
    for name, value in values.items():
        allowed = kinds.get(name)
        if allowed is None:
            continue
        ok = any(_is(value, k) for k in allowed)
        if not ok:
            words = " or ".join(_TYPE_WORDS.get(k, k.__name__) for k in allowed if k is not type(None))
            raise ConfigError(f"{prefix}{name.replace('_', '-') if prefix == '--' else name} = {value!r}: must be {words}")


def _is(value, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:  # an integer is a fine number (lr = 1 in a TOML file)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def load_config(cli: dict, toml_path: Path | None = None) -> TrainConfig:
    """Defaults < TOML file < command line (options left unset on the command line are None)."""
    values = {}
    if toml_path:
        try:
            values = tomllib.loads(Path(toml_path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"--config {toml_path}: {e}") from None
        values = values.get("train", values)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"--config {toml_path}: unknown keys {unknown}")
        if isinstance(values.get("extra"), (list, str)):
            values["extra"] = tuple([values["extra"]] if isinstance(values["extra"], str) else values["extra"])
        check_types(values, f"--config {toml_path}: ")
    values.update({k: v for k, v in cli.items() if v is not None and not (k == "extra" and not v)})
    missing = [k for k in ("crops", "out") if k not in values]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}")
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    if "extra" in values and not isinstance(values["extra"], tuple):  # a list from the command line
        values["extra"] = tuple(str(v) for v in values["extra"])
    if isinstance(values.get("fold"), str) and values["fold"] != "all":
        try:
            values["fold"] = int(values["fold"])
        except ValueError:
            raise ConfigError(f"--fold {values['fold']!r}: must be all or a fold number") from None
    cfg = TrainConfig(**values)
    cfg.check()
    return cfg


RESUMABLE = ("epochs", "device", "workers", "amp", "patience", "compile")


def config_from(saved: dict) -> TrainConfig:
    """The TrainConfig a saved config (checkpoint or config.json) describes; keys it does not know
    (config.json's resolved values, or a newer maskcls's options) are left out, new ones default."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in known}
    if "extra" in values:
        values["extra"] = tuple(values["extra"])
    return TrainConfig(**values)


def resume_config(out: Path, overrides: dict | None = None) -> TrainConfig:
    """The config of the run in `out`, with only --epochs, --device, --workers, --amp, --patience or
    --compile changed. Any other option given with --resume is an error: a resumed run is the same run."""
    from classify.training.runs import saved_config  # it reads checkpoints: torch

    saved = config_from(saved_config(Path(out)))
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    bad = sorted(k for k in overrides if k not in RESUMABLE and overrides[k] != getattr(saved, k))
    if bad:
        raise ConfigError(f"--resume continues the saved run; it accepts only "
                          f"{', '.join('--' + k for k in RESUMABLE)}, not {', '.join('--' + k.replace('_', '-') for k in bad)}")
    cfg = dataclasses.replace(saved, **{k: v for k, v in overrides.items() if k in RESUMABLE})
    cfg.check()
    return cfg


def changed_keys(cfg: TrainConfig, saved: TrainConfig) -> list[str]:
    """The options in which `cfg` differs from a saved run's config beyond what --resume may change."""
    return sorted(k for k in dataclasses.asdict(cfg) if k not in RESUMABLE and getattr(cfg, k) != getattr(saved, k))
