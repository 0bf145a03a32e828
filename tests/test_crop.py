"""The crop stage with a fake detector whose boxes are known: statuses, fallbacks, geometry, caching."""
import os
import json
import shutil

import numpy as np
import pytest

from preprocess import CropConfig, crop_dataset
from preprocess.crop import crop_square, square_around
from preprocess.subject import DEFAULT_PRIOR
from preprocess.imageio import read_crop
from preprocess.manifest import COLUMNS, read_manifest
from tests.conftest import photo, save_rgb

CFG = CropConfig(size=64, workers=2, device="cpu")


def test_every_photo_gets_one_row_with_labels_and_the_documented_status(raw_train, tmp_path, fake_detector):
    res = crop_dataset(raw_train, tmp_path / "c", CFG, detector=fake_detector)
    rows = read_manifest(tmp_path / "c")
    assert len(rows) == 21 and [r["image_id"] for r in rows] == [r["image_id"] for r in res.rows]
    by_id = {r["image_id"]: r for r in rows}
    # relaxed pass found the dim face; the faceless photo took its person's median box.
    assert by_id["000002_male_Asian_61/mask3"]["status"] == "relaxed"
    faceless = by_id["000010-1_male_Asian_22/normal"]
    assert faceless["status"] == "person_box"
    assert (faceless["x1"], faceless["y1"], faceless["x2"], faceless["y2"]) == (140, 160, 260, 280)
    assert res.counts == {"ok": 19, "relaxed": 1, "person_box": 1, "prior_box": 0, "unreadable": 0, "too_small": 0, "missing": 0,
                          "bad_name": 0}
    r = by_id["000002_male_Asian_61/incorrect_mask"]
    assert (r["person_id"], r["gender"], r["age"], r["mask"], r["age_group"], r["label"]) == ("000002", 0, 61, 1, 2, 8)
    assert r["status"] == "ok" and r["score"] == pytest.approx(0.99)
    assert (r["x1"], r["y1"], r["x2"], r["y2"], r["width"], r["height"]) == (140, 160, 260, 280, 384, 512)
    header = (tmp_path / "c" / "manifest.csv").read_text().splitlines()[0].split(",")
    assert header == COLUMNS


def test_a_photo_alone_without_face_gets_the_prior_box(tmp_path, fake_detector):
    raw = tmp_path / "eval"
    save_rgb(raw / "images" / "blank.jpg", photo(level=0))
    (raw / "info.csv").write_text("ImageID,ans\nblank.jpg,0\n")
    crop_dataset(raw, tmp_path / "c", CFG, detector=fake_detector)
    (r,) = read_manifest(tmp_path / "c")
    assert r["status"] == "prior_box" and r["label"] == -1 and r["reason"] == "no face found"
    assert (r["x1"], r["y1"], r["x2"], r["y2"]) == pytest.approx(DEFAULT_PRIOR.box(384, 512), abs=0.01)


def test_unreadable_and_missing_files_get_rows_with_reasons_and_the_run_goes_on(tmp_path, fake_detector):
    raw = tmp_path / "eval"
    save_rgb(raw / "images" / "good.jpg", photo())
    (raw / "images" / "text.jpg").write_text("this is not a photo")
    (raw / "images" / "empty.jpg").write_bytes(b"")
    (raw / "info.csv").write_text("ImageID,ans\ngood.jpg,0\ntext.jpg,0\nempty.jpg,0\ngone.jpg,0\n")
    res = crop_dataset(raw, tmp_path / "c", CFG, detector=fake_detector)
    rows = {r["image_id"]: r for r in read_manifest(tmp_path / "c")}
    assert rows["good.jpg"]["status"] == "ok"
    assert rows["text.jpg"]["status"] == "unreadable" and "not a readable image" in rows["text.jpg"]["reason"]
    assert rows["empty.jpg"]["status"] == "unreadable" and "0 bytes" in rows["empty.jpg"]["reason"]
    assert rows["gone.jpg"]["status"] == "missing"
    assert res.counts["unreadable"] == 2 and res.counts["missing"] == 1
    stand_in = read_crop(tmp_path / "c" / rows["text.jpg"]["crop"])  # a grey crop, so predict can still answer
    assert stand_in.shape == (64, 64, 3) and abs(int(stand_in.mean()) - 128) <= 2


def test_bad_names_are_cropped_but_carry_no_label(tmp_path, fake_detector):
    images = tmp_path / "raw" / "images"
    save_rgb(images / "000001_female_Asian_45" / "normal.jpg", photo())
    save_rgb(images / "000001_female_Asian_45" / "selfie.jpg", photo())
    res = crop_dataset(tmp_path / "raw", tmp_path / "c", CFG, detector=fake_detector)
    rows = {r["image_id"]: r for r in res.rows}
    bad = rows["000001_female_Asian_45/selfie"]
    assert bad["status"] == "bad_name" and bad["label"] == -1 and "selfie.jpg" in bad["reason"]
    assert rows["000001_female_Asian_45/normal"]["label"] == 16
    with pytest.raises(Exception, match="--strict"):
        crop_dataset(tmp_path / "raw", tmp_path / "c2", CropConfig(strict=True), detector=fake_detector)
    assert not (tmp_path / "c2" / "manifest.csv").exists()


def test_the_crop_is_centred_on_the_detected_face(tmp_path, fake_detector):
    """An off-centre box: its centre must land on the crop's centre, and the crop must hold the face."""
    box = (40, 300, 120, 400)  # near the left edge: the square with margin leaves the photo
    raw = tmp_path / "eval"
    save_rgb(raw / "images" / "a.png", photo(box))
    (raw / "info.csv").write_text("ImageID,ans\na.png,0\n")
    crop_dataset(raw, tmp_path / "c", CropConfig(size=100, margin=0.25, pack=False), detector=fake_detector)
    (r,) = read_manifest(tmp_path / "c")
    crop = read_crop(tmp_path / "c" / r["crop"]).min(axis=2)
    ys, xs = np.nonzero(crop > 200)
    assert abs((xs.min() + xs.max()) / 2 - 49.5) <= 2 and abs((ys.min() + ys.max()) / 2 - 49.5) <= 2
    # the face is 80x100 px, the square 150 px (margin 0.25 of the longer side on each side)
    assert abs((xs.max() - xs.min() + 1) - 80 * 100 / 150) <= 2
    assert abs((ys.max() - ys.min() + 1) - 100 * 100 / 150) <= 2


def test_geometry_helpers():
    assert square_around((0, 0, 100, 50), 0.5) == (50, 25, 200)
    img = np.zeros((100, 100, 3), np.uint8)
    img[40:60, 40:60] = 255
    out = crop_square(img, 50, 50, 40, 40)
    assert out[20, 20].min() == 255 and out[2, 2].max() == 0


def test_second_run_does_no_detection_and_a_settings_change_recrops(raw_train, tmp_path, fake_detector):
    out = tmp_path / "c"
    crop_dataset(raw_train, out, CFG, detector=fake_detector)
    first = (out / "manifest.csv").read_bytes()
    calls, photos = fake_detector.calls, fake_detector.photos
    res = crop_dataset(raw_train, out, CFG, detector=fake_detector)
    assert fake_detector.calls == calls and res.detected == 0
    assert (out / "manifest.csv").read_bytes() == first
    # a changed photo is detected again, nothing else (its person's choice is made again from the cache)
    save_rgb(raw_train / "images" / "000001_female_Asian_45" / "mask2.jpg", photo(seed=99))
    res = crop_dataset(raw_train, out, CFG, detector=fake_detector)
    assert res.detected == 1 and fake_detector.photos - photos == 1
    # another margin changes every crop: all 21 are cut again, from the cached detections
    before = read_crop(out / read_manifest(out)[0]["crop"])
    calls = fake_detector.calls
    res = crop_dataset(raw_train, out, CropConfig(size=64, margin=0.5), detector=fake_detector)
    assert res.detected == 0 and fake_detector.calls == calls
    assert json.loads((out / "crops.json").read_text())["config"]["margin"] == 0.5
    assert not np.array_equal(before, read_crop(out / read_manifest(out)[0]["crop"]))
    # another detector setting detects again
    fake_detector.settings = {**fake_detector.settings, "v": 2}
    assert crop_dataset(raw_train, out, CFG, detector=fake_detector).detected == 21


@pytest.mark.parametrize("window", [64, 4])  # 4: 21 rows in 6 windows, the last one short
def test_packed_array_equals_the_decoded_crops_and_no_temp_files_remain(raw_train, tmp_path, fake_detector, window,
                                                                         monkeypatch):
    import preprocess.manifest
    monkeypatch.setattr(preprocess.manifest, "PACK_WINDOW", window)
    out = tmp_path / "c"
    crop_dataset(raw_train, out, CFG, detector=fake_detector)
    rows = read_manifest(out)
    packed = np.load(out / "crops.npy")
    assert packed.shape == (21, 64, 64, 3)
    for i, r in enumerate(rows):
        assert np.array_equal(packed[i], read_crop(out / r["crop"]))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def test_a_photo_too_thin_for_a_face_gets_its_own_status_and_the_run_goes_on(tmp_path):
    """A 1 x 30000 PNG once made the detector's resize fail and the whole run die with a traceback: the real
    detector (no fake) runs here, on a folder that holds one such photo beside good ones."""
    from PIL import Image

    from tests.conftest import SAMPLES

    raw = tmp_path / "eval"
    (raw / "images").mkdir(parents=True)
    good = sorted((SAMPLES / "eval" / "images").iterdir())[:2]
    for p in good:
        shutil.copy(p, raw / "images" / p.name)
    Image.new("RGB", (1, 30000), (200, 180, 160)).save(raw / "images" / "thin.png")
    Image.new("RGB", (30000, 2), (200, 180, 160)).save(raw / "images" / "wide.png")
    (raw / "info.csv").write_text("ImageID,ans\n" + "".join(f"{n},0\n" for n in [p.name for p in good] + ["thin.png", "wide.png"]))
    crop_dataset(raw, tmp_path / "c", CropConfig(size=64, device="cpu"))
    rows = {r["image_id"]: r for r in read_manifest(tmp_path / "c")}
    assert len(rows) == 4
    for name in ("thin.png", "wide.png"):
        assert rows[name]["status"] == "too_small" and "too small or too thin" in rows[name]["reason"]
    assert all(rows[p.name]["status"] not in ("unreadable", "too_small") for p in good)


def _mapped_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's first line
            inside = line.rstrip("\n").endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not os.path.isfile("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")
def test_reading_crops_npy_keeps_a_bounded_share_of_it_resident(tmp_path, monkeypatch):
    """A DataLoader worker of a 12,600-photo predict showed its half of crops.npy (1.2 GB) as RSS: every page it
    had read stayed mapped. Now a reader gives the pages back every RELEASE_BYTES, with the same pixels."""
    from classify.data.dataset import CropDataset, PackedCrops
    from classify.data.transforms import build_transform

    n, side = 256, 128  # 48 KiB a crop, 12 MiB in all
    crops = tmp_path / "c"
    crops.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    np.save(crops / "crops.npy", pixels)
    rows = [{"index": i, "label": i % 18, "mask": 0, "crop": f"{i}.jpg"} for i in range(n)]
    resident = {}
    for budget in (1 << 30, 16 << 20, 1 << 20):  # far more than the file; a little more (read 3 times over); 1 MiB
        monkeypatch.setattr(PackedCrops, "RELEASE_BYTES", budget)
        ds = CropDataset(crops, rows, build_transform("none", side, train=False))
        ds._packed_path = crops / "crops.npy"
        for i in [*range(n)] * (3 if budget == 16 << 20 else 1):  # 36 MiB read, as epochs of a training run read
            assert np.array_equal(ds[i][0].numpy(), pixels[i].transpose(2, 0, 1))
        resident[budget] = _mapped_rss_kib(crops / "crops.npy")
        del ds
    # the whole file stays mapped under a budget it fits, however often it is read (a release would re-map it all
    # on the next pass); else the budget and what the kernel maps around a read (fault-around, large page-cache
    # folios: measured 1 MiB here)
    assert resident[1 << 30] >= 12 * 1024 and resident[16 << 20] >= 12 * 1024, resident
    assert resident[1 << 20] <= 1024 + 2048, resident


def _traced_peak(fn) -> int:
    """Bytes of Python memory at the peak of `fn()` beyond what was allocated before it."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_manifest_and_the_journal_are_written_as_made_not_built_whole_in_memory(tmp_path):
    """At the competition's size both files are MBs; built whole (text, then bytes) they took ~3x each
    file and set the peak of a cached rerun (BENCHMARKS §26). The files must hold every row, and the
    writing must not hold them: the traced peak stays under a quarter of each file's size."""
    from preprocess.journal import JOURNAL, compact, read_journal, unit_record
    from preprocess.manifest import write_manifest

    n = 4000
    rows = [{"image_id": f"{i:06d}_female_Asian_45/mask1", "source": f"images/{i:06d}_female_Asian_45/mask1.jpg",
             "crop": f"crops/{i:06d}/mask1.jpg", "label": i % 18, "status": "ok", "x1": 101.25, "y1": 98.5,
             "x2": 230.75, "y2": 260.0, "score": 0.998, "landmarks": [float(v) + 0.5 for v in range(10)]}
            for i in range(n)]
    peak = _traced_peak(lambda: write_manifest(tmp_path, rows, {"rows": n}))
    size = (tmp_path / "manifest.csv").stat().st_size
    assert [r["image_id"] for r in read_manifest(tmp_path)] == [r["image_id"] for r in rows]
    assert peak < size / 4, (peak, size)

    det = {"w": 384, "h": 512, "cands": [[101.25, 98.5, 230.75, 260.0, 0.998, 0, [float(v) for v in range(10)]]],
           "relaxed": False, "sha256": "ab" * 32}
    records = (unit_record("k", [r["source"]], [[1, 2]], {"size": 64, "margin": 0.2}, [det], [[1.0, 2.0, 3.0, 4.0]])
               for r in rows)
    peak = _traced_peak(lambda: compact(tmp_path, records))
    size = (tmp_path / JOURNAL).stat().st_size
    assert len(read_journal(tmp_path, "k")) == n
    assert peak < size / 4, (peak, size)
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"


def test_a_manifest_write_that_fails_half_way_leaves_the_old_manifest_and_no_temporary_file(raw_train, tmp_path,
                                                                                           fake_detector):
    """Written row by row, the manifest still replaces the old one whole or not at all (a full disk, a
    kill): no reader ever sees half a manifest."""
    import errno

    from preprocess.manifest import write_manifest

    out = tmp_path / "c"
    crop_dataset(raw_train, out, CFG, detector=fake_detector)
    before = (out / "manifest.csv").read_bytes()

    class Full(dict):
        def get(self, *a):
            raise OSError(errno.ENOSPC, "No space left on device")

    rows = [dict(r) for r in read_manifest(out)]
    rows[len(rows) // 2] = Full(rows[len(rows) // 2])
    with pytest.raises(OSError, match="No space left"):
        write_manifest(out, rows, {})
    assert (out / "manifest.csv").read_bytes() == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_run_resumed_after_a_kill_that_tore_the_journal_keeps_its_own_records_readable(raw_train, tmp_path,
                                                                                         fake_detector):
    """A kill mid-write leaves a torn last line in the journal. The resumed run's records must start on a
    line of their own: appended to the torn bytes, its first unit's record is unreadable, and a second
    kill before the journal is compacted detects that person again."""
    from preprocess.crop import settings_key
    from preprocess.journal import JOURNAL, read_journal

    out = tmp_path / "c"
    cfg = CropConfig(size=64, workers=2, device="cpu", batch_size=1)  # a unit a chunk
    crop_dataset(raw_train, out, cfg, detector=fake_detector)
    lines = (out / JOURNAL).read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    (out / JOURNAL).write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])  # killed while writing person 2

    def killed_at_the_second_unit(done, total):
        if done == total:
            raise KeyboardInterrupt  # the resumed run dies too, after both units are journalled, before compaction
    with pytest.raises(KeyboardInterrupt):
        crop_dataset(raw_train, out, cfg, detector=fake_detector, on_progress=killed_at_the_second_unit)
    cached = read_journal(out, settings_key(cfg, fake_detector))
    assert len(cached) == 21, f"{21 - len(cached)} photos' detections lost"


def test_a_crops_folder_written_inside_raw_is_skipped_when_raw_is_cropped_again(raw_train, tmp_path, fake_detector):
    """`maskcls crop people --out people/crops` (person folders directly in RAW): the second crop of RAW read
    the crops folder as a person, its files as bad_name photos, and failed ("image id crops/crops occurs more
    than once"). It is skipped with a warning that names it, and the rerun reuses the first run's crops."""
    from preprocess.layouts import discover
    from preprocess.manifest import read_manifest

    people = raw_train / "images"
    first = crop_dataset(people, people / "crops", CFG, detector=fake_detector)
    again = crop_dataset(people, people / "crops", CFG, detector=fake_detector)
    assert [r["image_id"] for r in read_manifest(people / "crops")] == [p.image_id for p in discover(raw_train).photos]
    assert len(read_manifest(people / "crops")) == 21 and again.detected == 0 and first.detected == 21
    assert [w for w in discover(people).warnings if "crops" in w] == [
        "crops: a maskcls crops folder (it holds crops.json), not a person: skipped"]
