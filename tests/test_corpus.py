"""The adversarial corpus: every bad or odd photo gets a row, a status and a reason, the summary
counts it, and predict still answers for every listed photo."""
import csv

import numpy as np
import pytest
from PIL import Image

from classify.inference.predictor import predict
from preprocess import CropConfig, crop_dataset
from preprocess.imageio import read_crop
from tests.conftest import photo, save_rgb
from tests.test_imageio import _png_header_only
from tests.test_predict import make_ckpt

BOX = (140, 160, 260, 280)
UPRIGHT = (214, 100, 334, 220)  # where orientation 6 puts the stored photo's face


def _pil(arr, mode=None):
    return Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)


@pytest.fixture
def corpus(tmp_path):
    img = tmp_path / "raw" / "images"
    p1 = img / "000001_female_Asian_45"
    p1.mkdir(parents=True)
    (p1 / "mask1.jpg").write_bytes(b"")
    save_rgb(p1 / "full.jpg", photo(BOX))
    data = (p1 / "full.jpg").read_bytes()
    (p1 / "full.jpg").unlink()
    (p1 / "mask2.jpg").write_bytes(data[: len(data) // 4])
    (p1 / "mask3.jpg").write_text("I am a text file")
    rgba = np.dstack([photo(BOX), np.full((512, 384), 255, np.uint8)])
    rgba[:40, :40] = (0, 0, 0, 128)  # half-transparent black over white: grey (127), no "face"
    _pil(rgba).save(p1 / "mask4.png")
    sixteen = (photo(BOX)[..., 0].astype(np.uint16) * 257)
    Image.fromarray(sixteen).save(p1 / "mask5.png")
    _pil(photo(BOX), "L").save(p1 / "incorrect_mask.jpg", quality=95)
    _pil(photo(BOX), "CMYK").save(p1 / "normal.jpg", quality=95)

    p2 = img / "000002_male_Asian_30"
    stored = np.random.default_rng(0).integers(0, 90, size=(384, 512, 3), dtype=np.uint8)
    stored[50:170, 100:220] = 255  # landscape as stored; orientation 6 turns it upright
    exif = Image.Exif()
    exif[0x0112] = 6
    p2.mkdir(parents=True)
    _pil(stored).save(p2 / "normal.jpg", exif=exif, quality=95)
    save_rgb(p2 / "mask1.jpg", photo(level=0))          # no face: takes this person's box
    _png_header_only(p2 / "mask2.png", 20000, 20000)    # decompression bomb
    for stem in ("mask3", "mask4", "mask5", "incorrect_mask"):  # framed like the upright normal photo
        save_rgb(p2 / f"{stem}.jpg", photo(UPRIGHT))

    for k, stem in enumerate(("mask1", "normal")):
        save_rgb(img / "000003_femal_x_20" / f"{stem}.jpg", photo(BOX, seed=k))     # bad folder name
    for stem in ("mask1", "mask6", "normal"):                                       # 4 missing, an eighth
        save_rgb(img / "000004_male_Asian_70" / f"{stem}.jpg", photo(BOX))
    for stem in ("mask1", "normal"):
        save_rgb(img / "000005_female_한국_33" / f"{stem}.jpg", photo(BOX))            # non-ASCII
    return tmp_path / "raw"


def test_crop_handles_every_bad_photo_with_a_row_status_and_reason(corpus, tmp_path, fake_detector):
    res = crop_dataset(corpus, tmp_path / "c", CropConfig(size=64), detector=fake_detector)
    rows = {r["image_id"]: r for r in res.rows}
    n_files = sum(1 for p in (corpus / "images").rglob("*") if p.is_file())
    assert len(rows) == len(res.rows) == n_files == 21
    p1 = "000001_female_Asian_45/"
    for stem, needle in (("mask1", "0 bytes"), ("mask2", "not a readable image"), ("mask3", "not a readable image")):
        assert rows[p1 + stem]["status"] == "unreadable" and needle in rows[p1 + stem]["reason"]
    for stem in ("mask4", "mask5", "incorrect_mask", "normal"):  # alpha, 16-bit, grey, CMYK: all decoded
        r = rows[p1 + stem]
        assert r["status"] == "ok", (stem, r)
        assert (round(r["x1"]), round(r["y1"]), round(r["x2"]), round(r["y2"])) == BOX
    rot = rows["000002_male_Asian_30/normal"]
    assert (rot["width"], rot["height"]) == (384, 512)
    assert abs(rot["x1"] - 214) <= 1 and abs(rot["y1"] - 100) <= 1 and abs(rot["x2"] - 334) <= 1
    crop = read_crop(tmp_path / "c" / rot["crop"])
    assert crop[28:36, 28:36].min() > 200  # the face is in the middle of the upright crop
    assert rows["000002_male_Asian_30/mask1"]["status"] == "person_box"
    bomb = rows["000002_male_Asian_30/mask2"]
    assert bomb["status"] == "unreadable" and "decompression bomb" in bomb["reason"]
    assert all(rows[f"000003_femal_x_20/{s}"]["status"] == "bad_name" for s in ("mask1", "normal"))
    assert rows["000004_male_Asian_70/mask6"]["status"] == "bad_name"
    assert rows["000004_male_Asian_70/normal"]["label"] == 14
    assert any("000004_male_Asian_70 lacks mask2, mask3, mask4, mask5, incorrect_mask" in w for w in res.warnings)
    assert rows["000005_female_한국_33/normal"]["race"] == "한국" and rows["000005_female_한국_33/normal"]["label"] == 16
    assert res.counts == {"ok": 13, "relaxed": 0, "person_box": 1, "prior_box": 0, "unreadable": 4, "too_small": 0, "missing": 0,
                          "bad_name": 3}
    with open(tmp_path / "c" / "manifest.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 21


def test_predict_answers_for_every_listed_photo_of_a_messy_eval_folder(tmp_path, fake_detector):
    raw = tmp_path / "eval"
    (raw / "images").mkdir(parents=True)
    save_rgb(raw / "images" / "사진.jpg", photo(BOX))
    save_rgb(raw / "images" / "b.jpg", photo(BOX, seed=1))
    _png_header_only(raw / "images" / "bomb.png", 20000, 20000)
    (raw / "images" / "zero.jpg").write_bytes(b"")
    (raw / "info.csv").write_text("\ufeffImageID,ans,note\n사진.jpg,0,a\nmissing.jpg,0,b\nbomb.png,0,c\nb.jpg,0,d\n"
                                  "zero.jpg,0,e\n", encoding="utf-8")
    pred = predict([make_ckpt(tmp_path / "m.pt")], raw, tmp_path / "sub.csv", cache=tmp_path / "cache", device="cpu",
                   workers=0, detector=fake_detector)
    with open(tmp_path / "sub.csv", encoding="utf-8") as f:
        sub = list(csv.DictReader(f))
    assert [r["ImageID"] for r in sub] == ["사진.jpg", "missing.jpg", "bomb.png", "b.jpg", "zero.jpg"]
    assert all(r["ans"].isdigit() and 0 <= int(r["ans"]) < 18 for r in sub)
    warned = " ".join(pred.warnings)
    for name in ("missing.jpg", "bomb.png", "zero.jpg"):
        assert name in warned
    assert "b.jpg" not in warned and "사진.jpg" not in warned
