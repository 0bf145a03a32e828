"""A model exported by `maskcls export`, run by onnxruntime: no torch, no GPU needed.

`OnnxModel(path)` opens the file and reads its `maskcls` metadata (what predict and serve need: image
size, eval preset and interpolation, crop settings and face prior, classes, `--old`, each model's
temperature); anything else (another tool's ONNX file, a damaged one, text) is refused with one line.
`run(crops)` takes uint8 N x 3 x S x S crops as the eval transform leaves them and returns each model's
logits (a list of M arrays, 1 view x N x 18), for `answer.answer` as a checkpoint's logits are.
`batches` turns rows of a crops folder into such arrays with the eval transform.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from preprocess.imageio import read_crop

from classify.errors import CheckpointError, ConfigError
from classify.inference.card import ModelCard, card_of
from classify.data.transforms import build_transform, channels_first

FORMAT, VERSION = "maskcls-onnx", 2  # 2: each model's logits and card (1: calibrated mean probabilities, flat keys)


def is_onnx(path) -> bool:
    return str(path).lower().endswith(".onnx")


def the_one_onnx(paths: list) -> Path:
    """The exported model among `paths`, refused with one line when it is not given alone (one graph
    holds a whole ensemble: `maskcls export` several checkpoints into one)."""
    if len(paths) != 1:
        raise ConfigError("give one exported .onnx model (export several checkpoints into one graph)")
    return Path(paths[0])


class OnnxModel:
    def __init__(self, path: Path, check: bool = True, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("an ONNX model needs onnxruntime: pip install 'maskcls[serve]'") from None
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such model file")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        # Idle intra-op threads sleep instead of spinning: under a server's load the spinning threads took the
        # cores the detector and the decoders needed (BENCHMARKS §24).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's own error types: any means "not a model it can run"
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path} is not an ONNX model onnxruntime can run ({first})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get("maskcls")
        try:
            self.meta = json.loads(raw) if raw else {}
        except ValueError:
            self.meta = {}
        if check and self.meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is an ONNX model but not one `maskcls export` wrote (no maskcls metadata)")
        if self.meta.get("version", 0) > VERSION:
            raise CheckpointError(f"{path} was written by a newer maskcls (format {self.meta['version']})")
        self.path = path
        self.cards = [card_of(c) for c in self.meta["cards"]] if "cards" in self.meta else [_format1_card(self.meta)]
        card = self.cards[0]  # export refuses models that differ in these
        self.img_size, self.crop, self.old, self.val_old = card.img_size, card.crop, card.old, card.val_old
        self.models = [c.label for c in self.cards] if "cards" in self.meta else list(self.meta.get("models", []))
        self.transform = build_transform(card.preset, self.img_size, train=False, interpolation=card.interpolation)

    def prepare(self, crop: np.ndarray) -> np.ndarray:
        """An RGB uint8 crop → the model's input, 3 x S x S uint8 (the eval transform, as predict's)."""
        return channels_first(self.transform(image=crop)["image"])

    @property
    def temperatures(self) -> list[float]:
        """Each model's temperature (format 1: its graph applied them itself, so 1 here)."""
        return [c.temperature for c in self.cards] if "cards" in self.meta else [1.0]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Each model's logits of the crops: M arrays of 1 x N x 18, float64."""
        x = np.ascontiguousarray(x, dtype=np.uint8)
        if self.meta.get("version", 1) < 2:  # its output is probabilities: their log is logits up to a constant
            p = self.session.run(["probs"], {"crop": x})[0].astype(np.float64)
            return [np.log(np.clip(p, 1e-30, 1.0))[None]]
        z = self.session.run(["logits"], {"crop": x})[0].astype(np.float64)
        return [z[:, m][None] for m in range(z.shape[1])]


def _format1_card(meta: dict) -> ModelCard:
    """A format-1 export described its (one-transform) ensemble with flat keys."""
    return ModelCard(name=(meta.get("models") or ["?"])[0], kwargs={}, img_size=int(meta.get("img_size", 224)),
                     preset=meta.get("preset", "base"), interpolation=meta.get("interpolation", "bilinear"),
                     old=int(meta.get("old", 60)), val_old=int(meta.get("val_old", 60)), crop=meta.get("crop") or {})


def batches(crops: Path, rows: list[dict], model: OnnxModel, size: int = 64):
    """(rows, uint8 batch) of `rows` of the crops folder, `size` at a time."""
    for k in range(0, len(rows), size):
        chunk = rows[k:k + size]
        yield chunk, np.stack([model.prepare(read_crop(Path(crops) / r["crop"])) for r in chunk])
