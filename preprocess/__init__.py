"""The crop stage: raw photos → face crops + a manifest with explicit labels."""
from .crop import CropConfig, CropResult, crop_dataset
from .layouts import LayoutError

__all__ = ["CropConfig", "CropResult", "crop_dataset", "LayoutError"]
