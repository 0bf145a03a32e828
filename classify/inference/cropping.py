"""The crops a model predicts from: a crops folder as it is, or raw photos cropped the way the model's
training crops were (its detector settings, crop size and margin, face prior), into a cache keyed by
the photos and those settings. Torch-free: predict with an ONNX model (predictor.py) uses it too.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Callable

from preprocess.crop import CropConfig, crop_dataset, crops_of_other_photos
from preprocess.detector import FaceDetector, build_detector
from preprocess.layouts import LayoutError, discover
from preprocess.subject import Prior

from classify.errors import CheckpointError


def crops_for(source: Path, crop_meta: dict, cache: Path | None, device: str, detector: FaceDetector | None = None,
              on_progress: Callable[[int, int], None] | None = None) -> tuple[Path, list[str]]:
    """The crops folder to predict from: `source` itself if it has a manifest, else `source` cropped
    with the model's crop settings (`crop_meta`: a checkpoint's or an ONNX model's `crop`) into the cache
    (reused when nothing changed). The folder's layout is checked first: a wrong folder is the user's
    mistake to hear about before anything about the model."""
    source = Path(source)
    if (source / "manifest.csv").is_file():
        return source, []
    discover(source)
    made_from = crops_of_other_photos(cache, source) if cache is not None else None
    if made_from:  # crop_dataset refuses it too, but in crop's words (its --out and --overwrite)
        raise LayoutError(f"--crops {cache} holds the crops of {made_from}, not of {source}: give another --crops "
                          "folder, where these photos are cropped")
    if not crop_meta.get("config"):
        raise CheckpointError("the checkpoint records no crop settings, so raw photos cannot be cropped the way "
                              "training saw them; run `maskcls crop` yourself and pass the crops folder")
    known = {f.name for f in fields(CropConfig)}
    cfg = CropConfig(**{k: v for k, v in crop_meta["config"].items() if k in known} | {"device": device, "strict": False})
    if detector is None:
        try:
            detector = build_detector(crop_meta.get("detector", {}), device, cfg.batch_size)
        except ValueError as e:
            raise CheckpointError(f"predict cannot crop these photos: {e}") from None
    # The training crops' face prior chooses each eval photo's face, as it does for `maskcls crop --prior`.
    prior = Prior.from_dict(crop_meta["prior"]) if crop_meta.get("prior") else None
    if cache is None:
        cache = default_cache(source, crop_meta, detector)
    # crop_dataset holds the folder's lock while it works: predicts sharing a cache take turns.
    res = crop_dataset(source, cache, cfg, detector=detector, on_progress=on_progress, prior=prior)
    if prior is None:
        res.warnings.append("the checkpoint records no face prior (its crops were made before maskcls learned "
                            "one): lone photos were cropped with the built-in prior")
    return cache, res.warnings


def prior_of(path: Path) -> Prior:
    """The face prior that `maskcls crop --prior PATH` and predict crop lone photos with: a training crops
    folder's (its crops.json), or a model's (a checkpoint, a run folder, a k-fold run, an .onnx export:
    read from its card, the prior its training crops learned)."""
    from preprocess.layouts import LayoutError
    from preprocess.manifest import META, read_meta

    path = Path(path)
    if path.is_dir() and (path / META).is_file():
        meta, what = read_meta(path), f"{path}/{META}"
    elif not path.exists():
        raise LayoutError(f"--prior {path}: no such file or folder")
    else:
        from classify.inference.backends import open_backend  # the card, whichever backend holds it

        try:
            meta, what = open_backend([path], workers=None).card.crop, str(path)
        except CheckpointError as e:
            raise LayoutError(f"--prior {path}: neither a crops folder (no {META}) nor a model ({e})") from None
    if not meta.get("prior"):
        raise LayoutError(f"--prior {path}: {what} records no face prior (made before maskcls learned one): "
                          "crop the training photos again, or leave --prior out for the built-in one")
    try:
        return Prior.from_dict(meta["prior"])
    except (KeyError, TypeError, ValueError) as e:
        raise LayoutError(f"--prior {path}: {what} holds a damaged face prior ({e}); crop the training photos again") from None


def default_cache(source: Path, crop_meta: dict, detector: FaceDetector) -> Path:
    """~/.cache/maskcls/crops/<key>: one folder per (photos folder, crop settings, detector, face prior),
    so checkpoints trained on crops made otherwise never overwrite each other's crops."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "maskcls" / "crops"
    what = [str(Path(source).resolve()), crop_meta.get("key"), crop_meta.get("config", {}).get("size"),
            crop_meta.get("config", {}).get("margin"), detector.settings, crop_meta.get("prior")]
    return base / hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
