"""The crop stage: raw photos → face crops + a manifest with explicit labels.

`from preprocess import crop_dataset` loads the crop stage (OpenCV, the detector) on first use only,
so a reader of the manifest (`preprocess.manifest`, `preprocess.labels`) does not pay for it.
"""
from .layouts import LayoutError

__all__ = ["CropConfig", "CropResult", "crop_dataset", "crop_photos", "LayoutError"]


def crop_photos(raw, out, detector=None, on_progress=None, prior=None, overwrite: bool = False, **options):
    """Crop the faces of a raw data set into the crops folder `out` (manifest.csv, crops, crops.npy), with any
    `maskcls crop` option by its Python name (`size=400`, `device="cuda"`); the same checks and errors as the
    command. `prior`: the face prior that crops lone photos (eval), as `maskcls crop --prior`: a training crops
    folder (its crops.json), or a `Prior` (a model's: `classify.prior_of("runs/b4")`). Returns the CropResult
    (rows, counts, warnings).

    >>> preprocess.crop_photos("input/data/train", "crops/train", size=400)

    (Not `preprocess.crop`: that name is the crop stage's module, `preprocess/crop.py`.)
    """
    from pathlib import Path

    from .crop import CropConfig, crop_dataset

    known = set(CropConfig.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        from .runtime import OptionError
        raise OptionError(f"crop: unknown option(s) {', '.join(unknown)}; the options are `maskcls crop`'s")
    if prior is not None and not hasattr(prior, "box"):  # a crops folder (a model's prior: classify.prior_of)
        from .manifest import META, read_meta
        from .subject import Prior

        meta = read_meta(Path(prior))
        if not meta.get("prior"):
            raise LayoutError(f"prior={prior}: no face prior there (not a crops folder, or made before maskcls learned "
                              f"one; {META} holds it); for a model's prior give classify.prior_of(path)")
        prior = Prior.from_dict(meta["prior"])
    return crop_dataset(Path(raw), Path(out), CropConfig(**options), detector=detector, on_progress=on_progress,
                        prior=prior, overwrite=overwrite)


def __getattr__(name: str):
    if name in ("CropConfig", "CropResult", "crop_dataset"):
        from . import crop
        return getattr(crop, name)
    raise AttributeError(f"module 'preprocess' has no attribute {name!r}")
