"""Bad and unusual photos: each is read correctly or refused with a reason, in bounded memory."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from preprocess.imageio import UnreadableImage, load_rgb
from tests.conftest import REPO


def _png_header_only(path, w, h):
    """A PNG that claims w x h pixels but carries almost no data (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))


def test_broken_files_are_refused_with_a_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image at all")
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 3])
    reasons = {}
    for name in ("empty.jpg", "text.jpg", "trunc.jpg", "absent.jpg"):
        with pytest.raises(UnreadableImage) as e:
            load_rgb(tmp_path / name)
        reasons[name] = str(e.value)
    assert "0 bytes" in reasons["empty.jpg"] and "not found" in reasons["absent.jpg"]
    assert "not a readable image" in reasons["text.jpg"] and "not a readable image" in reasons["trunc.jpg"]


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(UnreadableImage, match="400 MP, over the 40 MP limit"):
        load_rgb(tmp_path / "bomb.png")
    _png_header_only(tmp_path / "big.png", 8000, 6000)  # under PIL's own limit, over ours
    with pytest.raises(UnreadableImage, match="8000x6000 = 48 MP, over the 40 MP limit"):
        load_rgb(tmp_path / "big.png")


def test_importing_the_crop_stage_changes_no_process_wide_state(tmp_path):
    """PIL's bomb guard stays on for every other library in the process, and the umask is never
    flipped (a thread creating a file at that moment would get mode 0666); files still get the mode
    open() would give them."""

    import subprocess
    import sys

    code = ("import os, PIL.Image as I; before = I.MAX_IMAGE_PIXELS; os.umask(0o027)\n"
            "import preprocess.crop, preprocess.imageio as io, classify.training.train\n"
            "assert I.MAX_IMAGE_PIXELS == before, I.MAX_IMAGE_PIXELS\n"
            "from pathlib import Path\n"
            f"io.atomic_write_bytes(Path({str(tmp_path / 'f.bin')!r}), b'x')\n"
            "print(oct(os.stat(" + repr(str(tmp_path / "f.bin")) + ").st_mode & 0o777))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0o640"
    import preprocess.crop  # noqa: F401  (in this process too)
    from PIL import Image
    assert Image.MAX_IMAGE_PIXELS is not None


def test_modes_become_8bit_rgb(tmp_path):
    Image.new("RGBA", (32, 24), (255, 0, 0, 0)).save(tmp_path / "alpha.png")  # fully transparent red
    Image.fromarray(np.full((24, 32), 65535, np.uint16)).save(tmp_path / "w16.png")
    Image.new("L", (32, 24), 77).save(tmp_path / "grey.jpg")
    Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    alpha, w16, grey, cmyk = (load_rgb(tmp_path / n) for n in ("alpha.png", "w16.png", "grey.jpg", "cmyk.jpg"))
    for a in (alpha, w16, grey, cmyk):
        assert a.shape == (24, 32, 3) and a.dtype == np.uint8
    assert alpha.min() == 255                       # transparent → the white it is shown on
    assert w16.min() == 255                         # 16-bit white stays white, not clipped garbage
    assert abs(int(grey.mean()) - 77) <= 2
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60


def test_exif_rotation_is_applied(tmp_path):
    """A landscape array stored with orientation 6 (rotate 90° clockwise to view) must come out portrait."""
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :10] = 255  # white band on the left edge as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_rgb(tmp_path / "rot.jpg")
    assert out.shape == (60, 40, 3)
    assert out[:10].mean() > 200 and out[-10:].mean() < 40  # the left band is now on top


def test_a_photo_too_thin_or_small_for_a_face_and_a_non_photo_format_are_refused_from_the_header(tmp_path):
    from preprocess.imageio import TooSmall, photo_size

    Image.new("RGB", (1, 30000), (200, 200, 200)).save(tmp_path / "thin.png")  # a few hundred bytes
    Image.new("RGB", (12, 12), (200, 200, 200)).save(tmp_path / "tiny.png")
    Image.new("RGB", (64, 64), (200, 200, 200)).save(tmp_path / "photo.ico")  # a format Pillow reads, not a photo's
    Image.new("RGB", (64, 64), (200, 200, 200)).save(tmp_path / "photo.pcx")
    for name in ("thin.png", "tiny.png"):
        with pytest.raises(TooSmall, match="too small or too thin to hold a face") as e:
            load_rgb(tmp_path / name)
        assert e.value.status == "too_small"
        with pytest.raises(TooSmall):
            photo_size(tmp_path / name)
    for name in ("photo.ico", "photo.pcx"):
        with pytest.raises(UnreadableImage, match="not a photo in a format maskcls reads"):
            load_rgb(tmp_path / name)


def test_any_decoder_failure_is_the_photos_own_error(tmp_path, monkeypatch):
    import struct

    from PIL import PngImagePlugin

    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "a.png")

    def broken(self, *a, **k):
        raise struct.error("unpack requires a buffer of 4 bytes")  # what some damaged headers raise

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken)
    with pytest.raises(UnreadableImage, match="not a readable image: unpack requires"):
        load_rgb(tmp_path / "a.png")


def _pil_pixels(path):
    """What PIL's own path gives (exif_transpose, then RGB): the reference the fast JPEG path must match."""
    from PIL import ImageOps
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def test_a_plain_jpeg_decodes_to_pils_pixels_bit_for_bit_and_other_jpegs_take_pils_path(tmp_path, monkeypatch):
    import io

    import cv2

    from preprocess import imageio
    faces = sorted((REPO / "tests" / "assets" / "faces").glob("*.jpg"))
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (301, 203, 3), dtype=np.uint8)  # odd sizes: the chroma upsampling's edges
    Image.fromarray(noisy).save(tmp_path / "base.jpg", quality=95)
    Image.fromarray(noisy).save(tmp_path / "prog.jpg", quality=80, progressive=True)
    Image.fromarray(noisy).save(tmp_path / "444.jpg", quality=90, subsampling=0)
    Image.fromarray(noisy[:, :, 0]).save(tmp_path / "grey.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(noisy).save(tmp_path / "rot.jpg", exif=exif)
    (tmp_path / "tail.jpg").write_bytes((tmp_path / "base.jpg").read_bytes() + b"trailing bytes")
    calls = []
    real = cv2.imdecode
    monkeypatch.setattr(imageio.cv2, "imdecode", lambda *a: calls.append(1) or real(*a))
    fast = {"base.jpg", "prog.jpg", "444.jpg"} | {f.name for f in faces}
    for path in faces + sorted(tmp_path.glob("*.jpg")):
        calls.clear()
        got = load_rgb(path)
        assert got.dtype == np.uint8 and np.array_equal(got, _pil_pixels(path)), path.name
        assert bool(calls) == (path.name in fast), path.name  # grey, rotated, trailing bytes: PIL decodes them
        data = path.read_bytes()
        assert np.array_equal(load_rgb(io.BytesIO(data), size=len(data)), got), path.name  # serve's bytes
    # A truncated JPEG still gets PIL's refusal (libjpeg alone would pad it with grey and carry on).
    data = (tmp_path / "base.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(UnreadableImage, match="not a readable image"):
        load_rgb(tmp_path / "cut.jpg")


def test_an_output_path_that_is_a_pipe_or_a_symlink_is_written_through_not_replaced(tmp_path):
    """`predict --out /dev/stdout` (or a named pipe, or a symlink to a synced folder): the atomic write renamed a
    temporary file over the path, so a pipe or device became a plain file and its reader got nothing (as root,
    /dev/stdout and /dev/null themselves were replaced), and a symlink became a file while its target kept the old
    submission."""
    import os
    import stat
    import threading

    from classify.inference.rundir import write_csv
    from preprocess.imageio import atomic_write_bytes

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_csv(fifo, ["ImageID", "ans"], [["a.jpg", 3]])
    reader.join(timeout=30)
    assert got == [b"ImageID,ans\na.jpg,3\n"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)

    target, link = tmp_path / "synced" / "submission.csv", tmp_path / "submission.csv"
    target.parent.mkdir()
    target.write_text("old\n")
    link.symlink_to(target)
    write_csv(link, ["ImageID", "ans"], [["a.jpg", 5]])
    assert link.is_symlink() and target.read_text() == "ImageID,ans\na.jpg,5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "submission.csv", "synced"]  # no temporary left
    assert [p.name for p in target.parent.iterdir()] == ["submission.csv"]

    dangling = tmp_path / "dangling"  # a link whose target does not exist yet: written as before (the link replaced)
    dangling.symlink_to(tmp_path / "nowhere" / "x.bin")
    atomic_write_bytes(dangling, b"y")
    assert dangling.read_bytes() == b"y"
