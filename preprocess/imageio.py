"""Reading photos into upright RGB uint8 arrays, and writing crops atomically.

Every photo goes through `load_rgb`: EXIF orientation applied (the box is in those pixels), 16-bit
and palette/alpha/CMYK/grayscale modes converted to 8-bit RGB, and oversized images refused from
their header before any pixel is decoded, so a decompression bomb costs no memory. PIL's own bomb
guard (`Image.MAX_IMAGE_PIXELS`) is left as it is for every other library in the process.

Nothing here changes process-wide state at import: files are created with the mode open() gives
them (0666 less the umask, applied by the kernel).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import secrets
import stat
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 40_000_000  # 40 MP: far above any phone photo, far below a bomb
JPEG_QUALITY = 95
# The photo formats people send. Pillow registers ~40 more (EPS runs Ghostscript, FITS, SPIDER, MCIDAS,
# DDS...): none of them is a photo, and each is decoder code an upload could reach.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")  # JPEG includes phones' multi-picture (MPO) files
MIN_SIDE, MAX_ASPECT = 20, 10  # smaller, or thinner, cannot hold a face (and breaks the detector's resize)


class UnreadableImage(Exception):
    """A photo that cannot be turned into pixels; the message says why."""
    status = "unreadable"


class TooSmall(UnreadableImage):
    """A photo too small or too thin to hold a face (a 1 x 30000 PNG): refused before detection."""
    status = "too_small"


def content_digest(data: bytes) -> str:
    """A photo's identity by content (not name): the first 32 hex digits of its bytes' SHA-256."""
    return hashlib.sha256(data).hexdigest()[:32]


def load_photo(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, str]:
    """(upright RGB uint8 pixels, content digest) of a photo, reading its bytes once; UnreadableImage
    with the reason (the digest of what could be read is lost with it)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UnreadableImage("file not found") from None
    except OSError as e:
        raise UnreadableImage(f"cannot read the file: {e.strerror or e}") from None
    return load_rgb(io.BytesIO(data), max_pixels, size=len(data)), content_digest(data)


def load_rgb(path, max_pixels: int = MAX_PIXELS, size: int | None = None) -> np.ndarray:
    """Read a photo (a path, or a file object of `size` bytes) as an upright HxWx3 uint8 RGB array, or
    raise UnreadableImage with the reason."""
    src = path if hasattr(path, "read") else Path(path)
    try:
        if (size if size is not None else src.stat().st_size) == 0:
            raise UnreadableImage("empty file (0 bytes)")
        with Image.open(src, formats=FORMATS) as im:
            w, h = im.size
            _check_shape(w, h, max_pixels)
            fast = _plain_jpeg(im, src, w, h)
            if fast is not None:
                return fast
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb8(im)
    except UnreadableImage:
        raise
    except FileNotFoundError:
        raise UnreadableImage("file not found") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure (OSError, SyntaxError, struct.error...) is this photo's
        raise _unreadable(e, max_pixels) from None


def _plain_jpeg(im: Image.Image, src, w: int, h: int) -> np.ndarray | None:
    """A whole, upright, colour JPEG decoded by OpenCV's libjpeg-turbo, or None to take PIL's path.

    The same library and settings as PIL's decoder (slow integer IDCT, fancy upsampling): the pixels are
    PIL's, bit for bit (tests/test_imageio.py), in ~40% of the time (BENCHMARKS §23), because PIL decodes
    through its incremental buffer and copies twice more on the way to numpy. Only the plain case: a
    baseline or progressive YCbCr JPEG (mode RGB) with no EXIF rotation, ending in its EOI marker (a
    truncated file goes to PIL, which refuses it, where libjpeg would pad it with grey and carry on).
    One difference shows: a JPEG whose data is damaged inside (its EOI intact) decodes to PIL's pixels here
    too, but libjpeg writes its own "Corrupt JPEG data: ..." line to stderr, which PIL keeps quiet.
    """
    if im.format != "JPEG" or im.mode != "RGB" or im.getexif().get(0x0112, 1) != 1:
        return None
    if hasattr(src, "getbuffer"):
        data = src.getbuffer()
    elif hasattr(src, "read"):
        return None
    else:
        data = np.fromfile(str(src), np.uint8)
    buf = np.frombuffer(data, np.uint8)
    if len(buf) < 4 or buf[-2] != 0xFF or buf[-1] != 0xD9:
        return None
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None or bgr.shape != (h, w, 3):
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def photo_size(src, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of a photo from its header alone (nothing decoded), with load_rgb's format and shape
    checks; UnreadableImage otherwise."""
    try:
        with Image.open(src, formats=FORMATS) as im:
            w, h = im.size
    except Exception as e:  # noqa: BLE001 - any header parser failure is this photo's
        raise _unreadable(e, max_pixels) from None
    _check_shape(w, h, max_pixels)
    return w, h


def _unreadable(e: Exception, max_pixels: int) -> UnreadableImage:
    """The photo's own error for whatever opening or decoding it raised."""
    if isinstance(e, Image.DecompressionBombError):  # PIL's own guard, from the header, above twice its limit
        n = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(n[1]) / 1e6:.0f} MP" if n else "too large"
        return UnreadableImage(f"image is {size}, over the {max_pixels / 1e6:.0f} MP limit (possible decompression bomb)")
    if isinstance(e, Image.UnidentifiedImageError):
        return UnreadableImage(f"not a readable image: not a photo in a format maskcls reads ({', '.join(FORMATS)})")
    return UnreadableImage(f"not a readable image: {str(e) or type(e).__name__}")


def _check_shape(w: int, h: int, max_pixels: int) -> None:
    """Refuse, from the header, a photo that cannot hold a face and one whose pixels would not fit."""
    if min(w, h) < MIN_SIDE or max(w, h) > MAX_ASPECT * min(w, h):
        raise TooSmall(f"image is {w}x{h}: too small or too thin to hold a face (shorter side under "
                       f"{MIN_SIDE} px, or sides more than {MAX_ASPECT}:1)")
    if w * h > max_pixels:
        raise UnreadableImage(f"image is {w}x{h} = {w * h / 1e6:.0f} MP, over the {max_pixels / 1e6:.0f} MP limit "
                              "(possible decompression bomb)")


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
    with atomic_writer(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_writer(path: Path, text: bool = False):
    """A file to write `path` through piece by piece (binary, or UTF-8 text with no newline translation):
    a reader, or a killed run, sees the old file or the new one, never half. Large files (the manifest, the
    journal) are written as they are made instead of built whole in memory first.

    A symlink is written through: its target is replaced and the link stays. A path that is no regular file
    (/dev/stdout, /dev/null, a named pipe) is written straight into: renaming over it replaced the device
    or pipe with a file (as root, /dev/null itself), and its reader got nothing."""
    path = Path(path)
    try:
        st = os.stat(path)  # follows links
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        with (open(path, "w", encoding="utf-8", newline="") if text else open(path, "wb")) as f:
            yield f
        return
    if st is not None and path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    # 0o666: the kernel applies the umask, so the file gets the permissions open() would give it.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with (os.fdopen(fd, "w", encoding="utf-8", newline="") if text else os.fdopen(fd, "wb")) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError("JPEG encoding failed")
    return buf.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """RGB uint8 pixels of JPEG bytes, decoded as `read_crop` decodes a crop file."""
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("corrupt JPEG data")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_crop(path: str | os.PathLike) -> np.ndarray:
    """Decode a crop written by the crop stage (RGB uint8). Raises FileNotFoundError/ValueError if missing or corrupt."""
    data = np.fromfile(str(path), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"corrupt crop file {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
