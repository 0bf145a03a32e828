"""The label schema: the 18 codes, the age boundaries, and labels that never depend on listing order."""
import pytest

from preprocess import labels as L
from preprocess.layouts import discover
from tests.conftest import make_person

# The competition's table, written out by hand: (mask, gender, age_group) → class.
TABLE = {
    (0, 0, 0): 0, (0, 0, 1): 1, (0, 0, 2): 2, (0, 1, 0): 3, (0, 1, 1): 4, (0, 1, 2): 5,
    (1, 0, 0): 6, (1, 0, 1): 7, (1, 0, 2): 8, (1, 1, 0): 9, (1, 1, 1): 10, (1, 1, 2): 11,
    (2, 0, 0): 12, (2, 0, 1): 13, (2, 0, 2): 14, (2, 1, 0): 15, (2, 1, 1): 16, (2, 1, 2): 17,
}


def test_all_18_codes_match_the_table():
    assert len(TABLE) == L.NUM_CLASSES == 18
    for parts, code in TABLE.items():
        assert L.encode(*parts) == code
        assert L.decode(code) == parts


def test_file_names_map_to_mask_status():
    assert [L.mask_of_file(f"mask{k}") for k in range(1, 6)] == [0] * 5
    assert L.mask_of_file("incorrect_mask") == 1
    assert L.mask_of_file("normal") == 2
    assert L.mask_of_file("mask6") is None and L.mask_of_file("Normal") is None
    assert L.gender_of("male") == 0 and L.gender_of("female") == 1


@pytest.mark.parametrize("age,old,group", [(0, 60, 0), (29, 60, 0), (30, 60, 1), (59, 60, 1), (60, 60, 2),
                                           (95, 60, 2), (57, 58, 1), (58, 58, 2), (29, 58, 0), (30, 58, 1)])
def test_age_boundaries(age, old, group):
    assert L.age_group(age, old) == group


def test_unknown_parts_give_unknown_label_and_bad_parts_raise():
    assert L.encode(-1, 0, 0) == -1 and L.age_group(-1) == -1
    with pytest.raises(ValueError):
        L.encode(3, 0, 0)
    with pytest.raises(ValueError):
        L.decode(18)
    assert L.class_names(58)[17] == "not wear/female/>=58"


def test_labels_do_not_depend_on_folder_sort_order(tmp_path, monkeypatch):
    """'000010' sorts before '000002' as text; each person's labels must still come from its own name."""
    images = tmp_path / "raw" / "images"
    people = {"000002_female_Asian_61": (1, 61), "000010_male_Asian_25": (0, 25), "000100_female_Asian_35": (1, 35)}
    for folder in people:
        make_person(images, folder)

    def check():
        for p in discover(tmp_path / "raw").photos:
            gender, age = people[p.image_id.split("/")[0]]
            stem = p.image_id.split("/")[1]
            assert (p.gender, p.age, p.mask) == (gender, age, L.MASK_FILES[stem])

    check()
    # The file system may list folders and files in any order: reverse every listing and check again.
    from pathlib import Path
    real = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(real(self), reverse=True)))
    check()
    ids = [p.image_id for p in discover(tmp_path / "raw").photos]
    assert ids[:7] == [f"000002_female_Asian_61/{s}" for s in L.MASK_FILES]  # stable order whatever the listing
