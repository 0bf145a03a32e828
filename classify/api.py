"""maskcls as a library: load a trained model and predict photos held in files or in memory.

    import classify
    model = classify.load("runs/b4")                      # a checkpoint, run folder, k-fold run or .onnx
    model.card.classes[:3]                                 # what it answers, from its model card
    answers = model.predict(["a.jpg", pil_image, rgb_array])
    answers[0].name, answers[0].tasks["mask"], answers[0].box

Names: `load` and `Model.predict` as ultralytics' `YOLO(path)(image)` and timm's `create_model` read, so a
notebook user guesses them; `classify.train` and `preprocess.crop` are the verbs of the CLI (`maskcls train`,
`maskcls crop`) with the same options, checks and errors. There is no second path: `predict` writes the photos
it is given into a temporary eval folder (arrays as lossless PNG, files as they are) and calls the very
`predictor.predict` that `maskcls predict` calls (its detector, crop, backend and `answer`), so a photo gives the
same probabilities whichever way it comes.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from classify.errors import ConfigError

PHOTO_EXTS = (".jpg", ".jpeg", ".png")


@dataclass
class PhotoAnswer:
    """One photo's answer: the class and its name, each task's label and probability (the parts of the class,
    with their marginal probabilities), the 18 probabilities, and the face the crop stage chose."""
    source: str                 # the file path, or "image <k>" for a photo given in memory
    cls: int                    # 0..17
    name: str                   # e.g. "wear/female/30-59"
    tasks: dict                 # {"mask": {"label": "wear", "prob": 0.97}, "gender": ..., "age": ...}
    probs: np.ndarray           # 18 (calibrated, the models' mean)
    box: list[float] | None     # x1, y1, x2, y2 in the photo's pixels
    status: str                 # ok, relaxed, prior_box, no_face, ... (manifest.STATUSES)
    warnings: list[str] = field(default_factory=list)  # the photo's own (no face...), then the model's cautions

    @property
    def top1(self) -> int:
        return self.cls

    @property
    def top1conf(self) -> float:
        return float(self.probs[self.cls])


class Model:
    """A trained model (checkpoints, a run folder, a k-fold run, or an exported .onnx) ready to predict."""

    def __init__(self, path, device: str = "auto", workers: int | None = None):
        from classify.inference.backends import open_backend
        from preprocess.runtime import check_device

        check_device(device)
        paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
        self.paths, self.device = paths, device
        self.backend = open_backend(paths, device, workers)

    @property
    def card(self):
        """The model card (classes, tasks, image size, normalisation, crop settings, temperature, ...)."""
        return self.backend.card

    @property
    def cards(self) -> list:
        return self.backend.cards

    @property
    def cautions(self) -> list[str]:
        """What the model has not learned (a task no better than always answering the most common label, by
        its validation), as `maskcls predict` prints it; every PhotoAnswer's `warnings` carries it too."""
        from classify.inference.card import cautions

        return cautions(self.backend.cards)

    def __repr__(self) -> str:
        return f"Model({', '.join(self.backend.names)})"

    def predict(self, images, tta: int = 1, vote: str = "soft", calibrate: bool = True, batch_size: int = 64,
                detector=None) -> list[PhotoAnswer]:
        """The answer for each photo of `images`: file paths, a folder of photos, PIL images, or H x W x 3 uint8
        RGB arrays (one, or a list of them, mixed as you like), in the order given (a folder: sorted by name).

        >>> classify.load("runs/b4").predict("photo.jpg")[0].name
        'wear/female/30-59'
        """
        from classify.inference.answer import task_values
        from classify.inference.predictor import predict

        items = _photos(images)
        if not items:
            raise ConfigError("predict: no photo given (give file paths, a folder, PIL images or H x W x 3 uint8 arrays)")
        with tempfile.TemporaryDirectory(prefix="maskcls-predict-") as tmp:
            raw = Path(tmp) / "raw"
            (raw / "images").mkdir(parents=True)
            names = []
            for k, (source, item) in enumerate(items):
                names.append(_write(raw / "images", k, item))
            (raw / "info.csv").write_text("ImageID,ans\n" + "".join(f"{n},0\n" for n in names))
            pred = predict(self.paths, raw, None, tta, cache=Path(tmp) / "crops", device=self.device,
                           batch_size=batch_size, vote=vote, calibrate=calibrate, detector=detector,
                           backend=self.backend)
        by_name = {r["image_id"]: k for k, r in enumerate(pred.rows)}
        card, said = self.backend.card, self.cautions
        out = []
        for n, (source, _) in zip(names, items):
            k = by_name[n]
            r, y = pred.rows[k], int(pred.labels[k])
            box = [r["x1"], r["y1"], r["x2"], r["y2"]] if r.get("x1") is not None else None
            out.append(PhotoAnswer(source, y, pred.classes[y], task_values(pred.probs[k], y, card.old, card.tasks),
                                   pred.probs[k], box, r["status"],
                                   [w for w in pred.warnings if w.startswith(f"{n}:")] + said))
        return out


def load(path, device: str = "auto", workers: int | None = None) -> Model:
    """A trained model: a checkpoint, a run folder, a k-fold run folder (every fold, voted), several of them
    in a list, or an exported .onnx (run without torch).

    >>> model = classify.load("runs/k5")
    """
    return Model(path, device, workers)


def train(crops, out, **options) -> dict:
    """Train on a crops folder into the run folder `out`, with any `maskcls train` option by its Python name
    (`epochs=6`, `model="efficientnet_b0"`, `folds=5, fold="all"`, `overwrite=True`, `resume=True`); the same
    checks as the command, the same errors (ConfigError, ...). Returns the run's summary (summary.json).

    >>> classify.train("crops", "runs/r", epochs=6, model="mobilenet_v2")
    """
    from classify.training.config import TrainConfig
    from classify.training.train import fit

    resume, overwrite = bool(options.pop("resume", False)), bool(options.pop("overwrite", False))
    warn = options.pop("warn", print)
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"train: unknown option(s) {', '.join(unknown)}; the options are `maskcls train`'s "
                          "(their Python names: img_size, batch_size, ...)")
    cfg = TrainConfig(crops=str(crops), out=str(out), **options)
    cfg.check()
    return fit(cfg, resume=resume, overwrite=overwrite, warn=warn)


def prior_of(path):
    """The face prior of a training crops folder or of a model (checkpoint, run folder, .onnx): what
    `maskcls crop --prior PATH` and predict crop lone photos with (for `preprocess.crop(prior=...)`)."""
    from classify.inference.cropping import prior_of as read

    return read(Path(path))


def _photos(images) -> list[tuple[str, object]]:
    """(source, item) per photo: a path, a PIL image or an array, in order; a folder becomes its photos."""
    if isinstance(images, (str, Path)) or _is_image(images):
        images = [images]
    out = []
    for k, item in enumerate(images):
        if isinstance(item, (str, Path)):
            p = Path(item)
            if p.is_dir():
                out += [(str(f), f) for f in sorted(p.iterdir()) if f.suffix.lower() in PHOTO_EXTS]
            elif p.is_file():
                out.append((str(p), p))
            else:
                raise ConfigError(f"predict: {p}: no such photo or folder")
        elif _is_image(item):
            out.append((f"image {k}", item))
        else:
            raise ConfigError(f"predict: item {k} is a {type(item).__name__}: give file paths, a folder, PIL images "
                              "or H x W x 3 uint8 RGB arrays")
    return out


def _is_image(x) -> bool:
    return isinstance(x, np.ndarray) or type(x).__module__.startswith("PIL.")


def _write(folder: Path, k: int, item) -> str:
    """Put one photo into the temporary eval folder; its file name there."""
    if isinstance(item, Path):
        name = f"{k:05d}_{item.name}"
        shutil.copyfile(item, folder / name)
        return name
    arr = np.asarray(item.convert("RGB")) if not isinstance(item, np.ndarray) else item
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ConfigError(f"predict: image {k} is {arr.dtype} {tuple(arr.shape)}: give H x W x 3 uint8 RGB")
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr[..., ::-1]))  # lossless: the pixels as given
    if not ok:
        raise ConfigError(f"predict: image {k} could not be written as a PNG")
    name = f"{k:05d}.png"
    (folder / name).write_bytes(buf.tobytes())
    return name
