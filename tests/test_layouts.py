"""Each accepted layout, and the layout problems that must be reported rather than guessed."""
import pytest

from preprocess.layouts import LayoutError, discover
from tests.conftest import make_person, photo, save_rgb


def test_train_layout_parses_ids_as_strings_with_mixed_extensions(raw_train):
    d = discover(raw_train)
    assert d.layout == "train" and len(d.photos) == 21
    minus1 = [p for p in d.photos if p.person_id == "000010-1"]
    assert len(minus1) == 7 and all(p.source.endswith(".png") for p in minus1)
    assert {p.person_id for p in d.photos} == {"000001", "000002", "000010-1"}
    assert not d.warnings


def test_person_folders_directly_in_raw_are_accepted(tmp_path):
    make_person(tmp_path / "raw", "000001_female_Asian_45", ext=".jpeg")
    d = discover(tmp_path / "raw")
    assert d.layout == "train" and len(d.photos) == 7 and d.photos[0].source.startswith("000001_female_Asian_45/")


def test_bad_folder_and_file_names_are_reported_by_name(tmp_path):
    images = tmp_path / "raw" / "images"
    make_person(images, "000001_female_Asian_45")
    make_person(images, "000002_femal_Asian_45")       # gender does not parse
    save_rgb(images / "000001_female_Asian_45" / "mask6.jpg", photo())  # an eighth photo
    save_rgb(images / "000001_female_Asian_45" / "._mask1.jpg", photo())  # macOS resource fork
    d = discover(tmp_path / "raw")
    bad = {p.source: p.reason for p in d.photos if p.status == "bad_name"}
    assert len(bad) == 8
    assert "000002_femal_Asian_45" in bad["images/000002_femal_Asian_45/normal.jpg"]
    assert "mask6.jpg" in bad["images/000001_female_Asian_45/mask6.jpg"]
    assert any("hidden" in w for w in d.warnings)


def test_missing_photos_are_a_warning_naming_them(tmp_path):
    images = tmp_path / "raw" / "images"
    make_person(images, "000001_female_Asian_45")
    (images / "000001_female_Asian_45" / "mask4.jpg").unlink()
    d = discover(tmp_path / "raw")
    assert len(d.photos) == 6
    assert any("000001_female_Asian_45 lacks mask4" in w for w in d.warnings)


def test_two_folders_with_one_id_stop_before_any_work(tmp_path):
    images = tmp_path / "raw" / "images"
    make_person(images, "000001_female_Asian_45")
    make_person(images, "000001_male_Asian_45")
    with pytest.raises(LayoutError, match="000001_female_Asian_45, 000001_male_Asian_45"):
        discover(tmp_path / "raw")


def test_eval_layout_with_bom_extra_columns_and_a_missing_file(tmp_path):
    raw = tmp_path / "eval"
    save_rgb(raw / "images" / "a.jpg", photo())
    save_rgb(raw / "images" / "b.jpg", photo())
    save_rgb(raw / "images" / "unlisted.jpg", photo())
    (raw / "info.csv").write_text("\ufeffImageID,ans,extra\nb.jpg,0,x\nzzz.jpg,0,y\na.jpg,0,z\n", encoding="utf-8")
    d = discover(raw)
    assert d.layout == "eval"
    assert [p.image_id for p in d.photos] == ["b.jpg", "zzz.jpg", "a.jpg"]  # info.csv order
    assert [p.status for p in d.photos] == ["", "missing", ""]
    assert all(p.mask == -1 and p.gender == -1 for p in d.photos)
    assert any("unlisted.jpg" in w for w in d.warnings)


def test_generic_layout_reads_explicit_labels(tmp_path):
    raw = tmp_path / "g"
    save_rgb(raw / "x" / "one.png", photo())
    save_rgb(raw / "x" / "two.jpg", photo())
    (raw / "labels.csv").write_text("path,mask,gender,age,person_id\nx/one.png,2,female,61,p1\nx/two.jpg,0,0,20,p2\n")
    d = discover(raw)
    assert [(p.mask, p.gender, p.age, p.person_id) for p in d.photos] == [(2, 1, 61, "p1"), (0, 0, 20, "p2")]


@pytest.mark.parametrize("line,needle", [("x/a.jpg,3,0,20", "mask 3 is outside 0..2"),
                                         ("x/a.jpg,0,0,abc", "age 'abc'"),
                                         ("../etc/passwd,0,0,20", "must be relative"),
                                         ("/etc/passwd,0,0,20", "must be relative")])
def test_generic_layout_refuses_bad_values_and_escaping_paths(tmp_path, line, needle):
    raw = tmp_path / "g"
    raw.mkdir()
    (raw / "labels.csv").write_text(f"path,mask,gender,age\nx/ok.jpg,0,0,20\n{line}\n")
    with pytest.raises(LayoutError, match=needle.replace("(", r"\(")):
        discover(raw)


def test_info_csv_cannot_escape_its_folder(tmp_path):
    raw = tmp_path / "eval"
    raw.mkdir()
    (raw / "info.csv").write_text("ImageID,ans\n../../secret.jpg,0\n")
    with pytest.raises(LayoutError, match="must be relative"):
        discover(raw)


def test_unrecognised_layout_says_what_was_expected(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("hi")
    with pytest.raises(LayoutError, match="Expected one of"):
        discover(tmp_path / "raw")
