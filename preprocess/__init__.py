"""The crop stage: raw photos → face crops + a manifest with explicit labels.

`from preprocess import crop_dataset` loads the crop stage (OpenCV, the detector) on first use only,
so a reader of the manifest (`preprocess.manifest`, `preprocess.labels`) does not pay for it.
"""
from .layouts import LayoutError

__all__ = ["CropConfig", "CropResult", "crop_dataset", "LayoutError"]


def __getattr__(name: str):
    if name in ("CropConfig", "CropResult", "crop_dataset"):
        from . import crop
        return getattr(crop, name)
    raise AttributeError(f"module 'preprocess' has no attribute {name!r}")
