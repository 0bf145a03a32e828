"""Reading photos into upright RGB uint8 arrays, and writing crops atomically.

Every photo goes through `load_rgb`: EXIF orientation applied (the box is in those pixels), 16-bit
and palette/alpha/CMYK/grayscale modes converted to 8-bit RGB, and oversized images refused from
their header before any pixel is decoded, so a decompression bomb costs no memory.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 40_000_000  # 40 MP: far above any phone photo, far below a bomb
JPEG_QUALITY = 95

# We refuse large images ourselves (below), so PIL's own warning/limit is redundant for us.
Image.MAX_IMAGE_PIXELS = None


_UMASK = os.umask(0)
os.umask(_UMASK)


class UnreadableImage(Exception):
    """A photo that cannot be turned into pixels; the message says why."""


def load_rgb(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read a photo as an upright HxWx3 uint8 RGB array, or raise UnreadableImage with the reason."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImage("empty file (0 bytes)")
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise UnreadableImage(f"image is {w}x{h} = {w * h / 1e6:.0f} MP, over the {max_pixels / 1e6:.0f} MP limit "
                                      "(possible decompression bomb)")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb8(im)
    except UnreadableImage:
        raise
    except FileNotFoundError:
        raise UnreadableImage("file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL raises OSError for truncated/unknown data, SyntaxError/ValueError for some broken headers.
        raise UnreadableImage(f"not a readable image: {e}") from None


def _to_rgb8(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))  # alpha composited on white, like a viewer shows it
        im = Image.alpha_composite(bg, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader (or a killed run) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError("JPEG encoding failed")
    return buf.tobytes()


def read_crop(path: str | os.PathLike) -> np.ndarray:
    """Decode a crop written by the crop stage (RGB uint8). Raises FileNotFoundError/ValueError if missing or corrupt."""
    data = np.fromfile(str(path), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"corrupt crop file {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
