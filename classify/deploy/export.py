"""`maskcls export CKPT|RUN --out model.onnx`: the classifier as one ONNX graph that needs no torch.

The graph takes the crop as the eval transform leaves it, uint8 N x 3 x S x S (S = the checkpoint's image
size), and returns `logits` N x M x 18, one row per model (M > 1: a k-fold run): normalisation (each model's
own mean and std) and the models are inside. What comes after the logits (temperature, mean or vote,
class, task values) is `answer.answer`, the very function predict runs on a checkpoint's logits, with the
temperatures from the metadata: checkpoint and export cannot drift apart after the logits. Exported with `torch.onnx.export`
(dynamo), batch dimension dynamic. The model file's metadata (`maskcls` key, JSON) carries each model's
card exactly as its checkpoint holds it (card.py: classes, eval transform, crop settings and face prior,
`--old`/`--val-old`, calibration, provenance), the source checkpoints' SHA-256 and the maskcls version.

`--int8`: onnxruntime static quantisation (QDQ), calibrated on the run's validation crops; its change
of accuracy and macro F1 on those crops is printed and stored in the metadata.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from preprocess.imageio import atomic_write_bytes

from classify.inference import rundir
from classify.checkpoint import load_checkpoint
from classify.errors import CheckpointError, ConfigError
from classify.inference.onnx_model import FORMAT, VERSION, OnnxModel, batches
from classify.inference.torch_backend import check_ensemble, checkpoint_paths, load_model
from classify.data.transforms import normalize_factors
from classify.inference.card import ModelCard, card_of


class Deployable(nn.Module):
    """uint8 crops N x 3 x S x S → each model's logits of its normalised crop, N x M x 18."""

    def __init__(self, models: list[nn.Module], specs: list[ModelCard]):
        super().__init__()
        self.models = nn.ModuleList(models)
        factors = [normalize_factors(s.mean, s.std) for s in specs]  # what training's `normalize` applies
        self.register_buffer("scale", torch.stack([f[0] for f in factors]))
        self.register_buffer("shift", torch.stack([f[1] for f in factors]))

    def forward(self, crop: torch.Tensor) -> torch.Tensor:
        x = crop.to(torch.float32)
        return torch.stack([model(x * self.scale[k] - self.shift[k])["label"] for k, model in enumerate(self.models)], 1)


@dataclass
class ExportResult:
    path: Path
    models: int
    parity: float              # max |onnxruntime - torch| probability on the check crops (calibrated, soft mean),
                               # of the graph written (with --int8: the quantised one)
    checked: int               # crops the parity was checked on
    int8: dict | None          # {"fp32_f1", "int8_f1", "fp32_acc", "int8_acc", "agree", "photos"} with --int8
    notes: list[str] = field(default_factory=list)  # what onnxruntime's quantiser said that is worth reading


def export(checkpoints: list[Path], out: Path, int8: bool = False, check_crops: Path | None = None) -> ExportResult:
    """Export the checkpoints (run folders: their best.pt, a k-fold run: every fold's) as one ONNX file."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        raise ConfigError("maskcls export needs onnx and onnxscript: pip install 'maskcls[export]'")
    paths = checkpoint_paths(checkpoints)
    ckpts = [load_checkpoint(p) for p in paths]
    check_ensemble(ckpts)
    specs = [card_of(c) for c in ckpts]
    for what in ("img_size", "preset", "interpolation"):
        if len({getattr(s, what) for s in specs}) > 1:
            raise CheckpointError(f"these checkpoints differ in {what}: one graph takes one crop size and transform; "
                                  "export them separately")
    deploy = Deployable([load_model(c, torch.device("cpu")) for c in ckpts], specs).eval()
    out = Path(out)
    meta = _metadata(paths, ckpts, specs)
    _export_graph(deploy, specs[0].img_size, out, meta)
    rows, crops = _check_rows(paths[0], check_crops)
    parity, checked = _parity(deploy, out, crops, rows)
    result8, notes = None, []
    if int8:
        if not rows:
            raise ConfigError("--int8 calibrates on the run's validation crops: the checkpoint's crops folder "
                              "(or --crops) is not there")
        result8, notes = _quantise(out, crops, rows, meta)
        parity, checked = _parity(deploy, out, crops, rows)  # the int8 graph's own difference, not the fp32 one's
    return ExportResult(out, len(ckpts), parity, checked, result8, notes)


def _metadata(paths, ckpts, specs) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        maskcls_version = version("maskcls")
    except PackageNotFoundError:
        maskcls_version = "unknown"
    return {"format": FORMAT, "version": VERSION, "maskcls": maskcls_version, "cards": [s.to_dict() for s in specs],
            "checkpoints": [{"path": str(p), "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest()} for p in paths]}


def _export_graph(deploy: nn.Module, size: int, out: Path, meta: dict) -> None:
    import onnx

    x = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(deploy, (x,), str(raw), dynamo=True, input_names=["crop"], output_names=["logits"],
                          dynamic_shapes={"crop": {0: torch.export.Dim("batch", min=1, max=65536)}},
                          optimize=True, verbose=False, external_data=False)
        model = onnx.load(str(raw))
    set_metadata(model, meta)
    atomic_write_bytes(out, model.SerializeToString())


def set_metadata(model, meta: dict) -> None:
    for p in list(model.metadata_props):
        if p.key == "maskcls":
            model.metadata_props.remove(p)
    entry = model.metadata_props.add()
    entry.key, entry.value = "maskcls", json.dumps(meta)


def _check_rows(ckpt_path: Path, crops: Path | None) -> tuple[list[dict], Path | None]:
    """The validation rows of the checkpoint's run (split.csv) in its crops folder, when both are there."""
    from classify.data.dataset import load_rows, person_key

    run = Path(ckpt_path).parent
    crops = Path(crops) if crops else Path(rundir.read_config(run).get("crops", "")) if rundir.read_config(run) else None
    if crops is None or not (crops / "manifest.csv").is_file():
        return [], None
    usable = load_rows(crops)[1]
    split = rundir.read_split(run) if (run / rundir.SPLIT).is_file() else {}
    val = [r for r in usable if split.get(person_key(r)) == "val"]
    return (val or usable[:64]), crops


def _parity(deploy: nn.Module, path: Path, crops: Path | None, rows: list[dict]) -> tuple[float, int]:
    """The largest difference between the answers' probabilities on up to 64 crops, of onnxruntime's logits and
    of torch's (both through `answer.answer` with the models' temperatures)."""
    from classify.inference.answer import answer

    model = OnnxModel(path)
    if crops is None:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (4, 3, model.img_size, model.img_size), dtype=np.uint8)
    else:
        x = np.concatenate([b for _, b in batches(crops, rows[:64], model, 64)])
    with torch.no_grad():
        want = deploy(torch.from_numpy(x)).double().numpy().transpose(1, 0, 2)
    got = answer(model.run(x), model.temperatures).scores
    return float(np.abs(got - answer(list(want), model.temperatures).scores).max()), len(x)


def _quantise(path: Path, crops: Path, rows: list[dict], meta: dict) -> tuple[dict, list[str]]:
    """Static int8 quantisation calibrated on the validation crops; the fp32 and int8 scores on them, and
    what the quantiser said beyond the expected (`_onnxruntime_log`)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from classify.inference.answer import answer
    from classify.metrics import scores

    fp32 = OnnxModel(path)
    data = [b for _, b in batches(crops, rows, fp32, 32)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(data)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"crop": b}

    with tempfile.TemporaryDirectory() as tmp:
        q, pre = Path(tmp) / "int8.onnx", Path(tmp) / "pre.onnx"
        with _onnxruntime_log() as notes:
            quant_pre_process(str(path), str(pre))  # the shape inference and folding onnxruntime asks for
            quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
        int8 = OnnxModel(q, check=False)
        x = np.concatenate(data)
        y = np.array([r["label"] for r in rows])
        p32, p8 = (answer(m.run(x), fp32.temperatures).labels for m in (fp32, int8))
        s32, s8 = scores(y, p32), scores(y, p8)
        change = {"photos": len(y), "fp32_f1": s32["f1"], "int8_f1": s8["f1"], "fp32_acc": s32["acc"],
                  "int8_acc": s8["acc"], "agree": float((p32 == p8).mean())}
        model = onnx.load(str(q))
    set_metadata(model, meta | {"int8": change})
    atomic_write_bytes(path, model.SerializeToString())
    return change, notes


# onnxruntime's quantiser logs through the root logger. With per_channel=True it notes every 1-D weight
# (a LayerNorm's, a head's bias) that it quantises per tensor instead ("Axis 1 is out-of-range for
# weight ... with rank 1"): expected, nothing to act on. Anything else it says is passed on.
_EXPECTED = re.compile(r"Axis \d+ is out-of-range for weight .* with rank 1")


@contextlib.contextmanager
def _onnxruntime_log():
    import logging

    notes: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            text = record.getMessage().strip()
            if record.levelno >= logging.WARNING and not _EXPECTED.search(text) and text not in notes:
                notes.append(text)

    root, keep = logging.getLogger(), Keep()
    saved = root.handlers[:], root.level
    root.handlers[:] = [keep]
    root.setLevel(logging.WARNING)
    try:
        yield notes
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
