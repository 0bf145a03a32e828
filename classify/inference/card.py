"""The model card: the one description of a trained model, and the only module that writes or reads it.

`train` writes it into every checkpoint (`ckpt["card"]`), `export` writes each model's card into the ONNX
metadata (`meta["cards"]`), both with `ModelCard.to_dict()`, so the two say the same; `card_of` reads it
back from either (and from checkpoints written before cards, whose description was spread over the
payload's top-level keys). Anchors: timm's `pretrained_cfg` travels with the model; nanoGPT builds its
checkpoint dict in one place.

| field | what |
| --- | --- |
| name, kwargs | the architecture (`models.nets.create_model(name, **kwargs)`) |
| classes, tasks | the 18 class names and each task's names, at `old` |
| old, val_old | the training and the validation age boundary |
| img_size, preset, interpolation, mean, std | the eval transform and the normalisation |
| amp | the mixed precision the model was trained with |
| crop | the training crops' settings, face prior and key (crops.json): how predict crops raw photos |
| calibration | the temperature (`temperature`) and how it was fitted (`fitted`, `fitted_on`, ECE, NLL) |
| provenance | the weights it started from (and the note about them), the training crops folder |
| validation | what its validation (a k-fold run: out of fold) said of it: the tasks it has not learned |
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from preprocess import labels as L

from classify.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from classify.errors import CheckpointError

VERSION = 1


@dataclass(frozen=True)
class ModelCard:
    name: str
    kwargs: dict
    img_size: int = 224
    preset: str = "base"
    interpolation: str = "bilinear"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    old: int = L.DEFAULT_OLD
    val_old: int = L.DEFAULT_OLD
    amp: str = "off"
    crop: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    classes: list = None
    validation: dict = field(default_factory=dict)
    tasks: dict = None
    version: int = VERSION

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))
        if self.classes is None:
            object.__setattr__(self, "classes", L.class_names(self.old))
        if self.tasks is None:
            object.__setattr__(self, "tasks", {t: list(n) for t, n in L.TASKS.items()} | {"age": list(L.age_names(self.old))})

    @property
    def temperature(self) -> float:
        """What predict applies (1: no calibration, or a fit that was not trusted)."""
        return float(self.calibration.get("temperature", 1.0))

    @property
    def label(self) -> str:
        """The model as a person names it: resnet18, attention(resnet18), timm/convnext_tiny."""
        return f"{self.name}({self.kwargs['backbone']})" if self.kwargs.get("backbone") else self.name

    @property
    def norm(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}

    def calibrated(self, calibration: dict) -> "ModelCard":
        return replace(self, calibration=dict(calibration))

    def validated(self, validation: dict) -> "ModelCard":
        return replace(self, validation=dict(validation))

    @property
    def unlearned(self) -> tuple[str, ...]:
        """The tasks its validation found it has not learned (no better than the most common label)."""
        return tuple((self.validation or {}).get("not_learned") or {})

    @property
    def caution(self) -> str | None:
        """The caution of a model that has not learned a task (metrics.not_learned_caution), or None."""
        from classify.metrics import not_learned_caution

        v = self.validation or {}
        return not_learned_caution({t: tuple(ab) for t, ab in (v.get("not_learned") or {}).items()},
                                   v.get("on", "validation"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


def new_card(cfg, model_kwargs: dict, norm: dict, weights: str, note: str | None, crop_meta: dict) -> ModelCard:
    """The card of a run about to train with `cfg` (its calibration comes after training)."""
    return ModelCard(cfg.model, dict(model_kwargs), cfg.img_size, cfg.preset, norm["interpolation"], tuple(norm["mean"]),
                     tuple(norm["std"]), cfg.old, cfg.val_old, cfg.amp, crop_meta or {}, {},
                     {"weights": weights, "weights_note": note, "crops": str(cfg.crops)})


def card_of_run(run) -> ModelCard:
    """The card of a run folder's (or one fold's) best.pt; a k-fold run folder: its first fold's (the folds
    share their crops, classes and temperature). Loads the checkpoint, so torch is imported here."""
    from pathlib import Path

    from classify.checkpoint import load_checkpoint
    from classify.inference.rundir import BEST, fold_dirs

    run = Path(run)
    ckpt = run / BEST if (run / BEST).is_file() else next((f / BEST for f in fold_dirs(run)), run / BEST)
    return card_of(load_checkpoint(ckpt))


def card_of(obj: dict) -> ModelCard:
    """The card of a checkpoint, of an ONNX model's metadata entry, or a card dict; a checkpoint from
    before cards is read from its top-level keys (temperature 1 where it had none)."""
    if "card" in obj:
        obj = obj["card"]
    if "version" in obj and "name" in obj:  # a card dict
        if not isinstance(obj["version"], int) or obj["version"] > VERSION:
            raise CheckpointError(f"the model's card is of version {obj['version']!r}, newer than this maskcls reads "
                                  f"({VERSION}): upgrade maskcls to use this model")
        known = set(ModelCard.__dataclass_fields__)
        return ModelCard(**{k: v for k, v in obj.items() if k in known})
    cfg = obj.get("config") or {}
    calibration = obj.get("calibration") or ({"temperature": obj["temperature"]} if "temperature" in obj else {})
    if "temperature" in obj:
        calibration = dict(calibration) | {"temperature": float(obj["temperature"])}
    return ModelCard(obj["model"]["name"], obj["model"].get("kwargs", {}), obj.get("img_size", 224),
                     obj.get("preset", "base"), obj.get("interpolation", "bilinear"), tuple(obj.get("mean", IMAGENET_MEAN)),
                     tuple(obj.get("std", IMAGENET_STD)), cfg.get("old", L.DEFAULT_OLD), cfg.get("val_old", L.DEFAULT_OLD),
                     cfg.get("amp", "off"), obj.get("crop") or {}, calibration,
                     {"weights": obj.get("weights"), "weights_note": obj.get("weights_note"), "crops": cfg.get("crops")})


def cautions(cards) -> list[str]:
    """The distinct cautions of an ensemble's cards (each a model that has not learned a task), in order:
    what predict prints and what serve answers with."""
    return list(dict.fromkeys(c.caution for c in cards if c.caution))
