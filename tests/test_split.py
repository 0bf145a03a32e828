"""Person-level splits: no person on both sides, stratified, reproducible; k folds partition people."""
import random

from classify.data.dataset import person_key, split_persons


def _rows(n_people=60, seed=0):
    rnd = random.Random(seed)
    rows = []
    for p in range(n_people):
        g, a = rnd.randrange(2), rnd.choice([0, 0, 1, 1, 1, 2])
        for k in range(7):
            rows.append({"person_id": f"{p:06d}", "image_id": f"{p:06d}/{k}", "gender": g, "age_group": a,
                         "age": (20, 45, 70)[a]})
    return rows


def test_no_person_is_in_two_splits_and_every_photo_follows_its_person():
    rows = _rows()
    split = split_persons(rows, seed=3, val_ratio=0.2)
    sides = {}
    for r in rows:
        sides.setdefault(person_key(r), set()).add(split[person_key(r)])
    assert all(len(s) == 1 for s in sides.values())
    n_val = sum(v == "val" for v in split.values())
    assert n_val == 12  # 20% of 60 people


def test_split_is_stratified_and_reproducible():
    rows = _rows(200)
    a, b, c = split_persons(rows, seed=7), split_persons(rows, seed=7), split_persons(rows, seed=8)
    assert a == b and a != c
    people = {person_key(r): (r["gender"], r["age_group"]) for r in rows}
    for stratum in set(people.values()):
        members = [p for p, s in people.items() if s == stratum]
        share = sum(a[p] == "val" for p in members) / len(members)
        assert abs(share - 0.2) <= 1.0 / len(members) + 0.01


def test_k_folds_partition_the_people():
    rows = _rows(50)
    folds = [split_persons(rows, seed=1, folds=5, fold=k) for k in range(5)]
    val_sets = [{p for p, s in f.items() if s == "val"} for f in folds]
    assert set().union(*val_sets) == {person_key(r) for r in rows}
    assert sum(len(v) for v in val_sets) == 50  # disjoint
    assert all(8 <= len(v) <= 12 for v in val_sets)


def test_rows_without_person_id_are_split_per_photo():
    rows = [{"person_id": "", "image_id": f"x{i}", "gender": 0, "age_group": 0, "age": 20} for i in range(10)]
    split = split_persons(rows, val_ratio=0.3)
    assert len(split) == 10 and sum(v == "val" for v in split.values()) == 3


def test_label_fixes_change_labels_by_photo_or_person_and_refuse_unknown_ids(tmp_path):
    import pytest

    from classify.data.dataset import load_rows
    from classify.errors import ConfigError
    from tests.conftest import make_crops

    crops = make_crops(tmp_path / "c", people=3)
    fixes = tmp_path / "fixes.csv"
    # person 0000 is female (gender 0 → male in make_crops: p % 2 == 0 → 0); fix the whole person to female,
    # and one photo of person 0001 from mask (wear) to normal
    fixes.write_text("image_id,field,value\n0000,gender,female\n0001/mask3,mask,2\n")
    _, rows = load_rows(crops, label_fixes=fixes)
    by_id = {r["image_id"]: r for r in rows}
    assert all(by_id[f"0000/{s}"]["gender"] == 1 for s in ("mask1", "normal"))
    assert by_id["0000/mask1"]["label"] == 3 * 1 + by_id["0000/mask1"]["age_group"]
    assert by_id["0001/mask3"]["mask"] == 2 and by_id["0001/mask3"]["label"] >= 12
    assert by_id["0001/mask4"]["mask"] == 0
    fixes.write_text("image_id,field,value\n9999/mask1,gender,male\n0001/mask1,colour,red\n")
    with pytest.raises(ConfigError, match="2 fix"):
        load_rows(crops, label_fixes=fixes)


def test_a_label_fix_of_an_id_without_folder_applies_once():
    from pathlib import Path
    import tempfile

    from classify.data.dataset import apply_label_fixes

    rows = [{"image_id": "a.jpg", "gender": 0, "age": 20, "mask": 0, "age_group": 0, "label": 0}]
    with tempfile.TemporaryDirectory() as d:
        fixes = Path(d) / "f.csv"
        fixes.write_text("image_id,field,value\na.jpg,age,65\n")
        done = apply_label_fixes(rows, fixes, old=60)
        assert (done["fixes"], done["photos"], done["changed"], done["people"]) == (1, 1, 1, 1)
        fixes.write_text("image_id,field,value\na.jpg,age,70\n")  # the same group: no label changes
        assert apply_label_fixes(rows, fixes, old=60)["changed"] == 0
    assert rows[0]["age_group"] == 2 and rows[0]["label"] == 2


def test_dataset_items_are_the_crops_pixels_in_the_models_layout_from_the_pack_or_the_jpegs(tmp_path):
    import numpy as np
    import torch

    from classify.data.dataset import CropDataset, load_rows
    from classify.data.transforms import build_transform
    from preprocess.imageio import read_crop
    from tests.conftest import make_crops

    crops = make_crops(tmp_path / "c", people=3, size=48)
    _, rows = load_rows(crops)
    packed = CropDataset(crops, rows, build_transform("base", 48, train=False))
    assert packed._packed_path is not None
    from_pack = {i: packed[i] for i in (0, 5, 20)}
    (crops / "crops.npy").unlink()
    jpegs = CropDataset(crops, rows, build_transform("base", 48, train=False))
    assert jpegs._packed_path is None
    for i, (x, label, index) in from_pack.items():
        assert x.shape == (3, 48, 48) and x.dtype == torch.uint8 and int(label) == rows[i]["label"]
        expected = read_crop(crops / rows[index]["crop"]).transpose(2, 0, 1)  # channels first, RGB order kept
        assert np.array_equal(x.numpy(), expected)
        assert torch.equal(jpegs[i][0], x)
    train = CropDataset(crops, rows, build_transform("base", 40, train=True), seed=3)
    a, b = train[4][0], train[4][0]
    train.set_epoch(1)
    c = train[4][0]
    assert a.shape == (3, 40, 40) and torch.equal(a, b) and not torch.equal(a, c)


def test_normalize_standardises_each_channel_of_a_loader_batch_and_refuses_another_layout():
    import numpy as np
    import pytest
    import torch

    from classify.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    expected = (x.double() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for channels_last in (False, True):
        y = normalize(x, channels_last=channels_last)
        assert y.shape == (2, 3, 5, 4) and y.dtype == torch.float32
        assert np.allclose(y.numpy(), expected.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        normalize(x.permute(0, 2, 3, 1).contiguous())  # an H x W x 3 batch, the old layout


def test_changing_only_the_training_old_moves_no_validation_person(tmp_path):
    """The split is stratified at --val-old (the competition's boundary): --old 58 and --old 60 validate on
    the same people, so their scores compare. Stratified at the training --old, the people aged 58-59
    change stratum and the split moves."""
    from classify.training.config import TrainConfig
    from classify.data.dataset import prepare_data
    from tests.conftest import make_crops

    crops = make_crops(tmp_path / "c", people=40, ages=(22, 45, 58, 59, 70))
    splits = {old: prepare_data(TrainConfig(crops=str(crops), out="x", old=old, val_old=60)).split
              for old in (55, 58, 60)}
    assert splits[58] == splits[60] == splits[55]
    by_val_old = prepare_data(TrainConfig(crops=str(crops), out="x", old=58, val_old=58)).split
    assert by_val_old != splits[60]  # the boundary the split uses does matter: this test can see a change


def test_a_label_fix_out_of_range_is_one_error_naming_the_line(tmp_path):
    import pytest

    from classify.data.dataset import apply_label_fixes
    from classify.errors import ConfigError

    rows = [{"image_id": "a.jpg", "gender": 0, "age": 20, "mask": 0, "age_group": 0, "label": 0}]
    for field, value in (("mask", "3"), ("gender", "2"), ("age", "-4"), ("mask", "-1")):
        (tmp_path / "fix.csv").write_text(f"image_id,field,value\na.jpg,{field},{value}\n")
        with pytest.raises(ConfigError, match=rf"line 2: {field} '{value}' is outside"):
            apply_label_fixes(rows, tmp_path / "fix.csv", 60)
    assert rows[0]["label"] == 0  # nothing applied


def test_one_label_fix_moves_no_validation_person(tmp_path):
    """A run with --label-fixes validates on the same people as one without (the split is made on the labels
    as cropped), in a single split and in every fold; a one-draw shuffle moved 31 of 300 people here."""
    from classify.data.dataset import prepare_data
    from classify.training.config import TrainConfig
    from tests.conftest import make_crops

    crops = make_crops(tmp_path / "c", people=300, size=8)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("image_id,field,value\n0007,age,75\n0010,gender,female\n")
    for kw in ({}, {"folds": 5, "fold": 3}):
        plain = prepare_data(TrainConfig(crops=str(crops), out="x", **kw))
        fixed = prepare_data(TrainConfig(crops=str(crops), out="x", label_fixes=str(fixes), **kw))
        assert plain.split == fixed.split
        assert {r["image_id"] for r in plain.val_rows} == {r["image_id"] for r in fixed.val_rows}
        changed = [r for r in fixed.val_rows + fixed.train_rows if r["person_id"] in ("0007", "0010")]
        assert changed and all(r["age"] == 75 for r in changed if r["person_id"] == "0007")


def test_a_person_more_or_less_moves_at_most_one_other_person_per_stratum():
    rows = _rows(300)
    for split_kw in ({"val_ratio": 0.2}, {"folds": 5, "fold": 2}):
        a = split_persons(rows, seed=4, **split_kw)
        b = split_persons([r for r in rows if r["person_id"] != "000013"], seed=4, **split_kw)
        moved = [p for p in b if a[p] != b[p]]
        # 2 genders x 3 age groups; k folds: one person per slice edge (the one-draw shuffle moved 50 and 84 here)
        assert len(moved) <= 6 * (split_kw.get("folds", 2) - 1), (split_kw, len(moved))


def test_extra_photos_of_a_validation_person_are_refused_and_extra_ids_never_stand_for_main_people(tmp_path):
    """--extra once took other photos of a validation person (only identical bytes were refused) and wrote its
    person ids over the main people's entries in split.csv."""
    import pytest

    from classify.data.dataset import prepare_data
    from classify.errors import ConfigError
    from classify.training.config import TrainConfig
    from preprocess.manifest import read_manifest, read_meta, write_manifest
    from tests.conftest import make_crops

    crops = make_crops(tmp_path / "c", people=12, size=16)
    base = prepare_data(TrainConfig(crops=str(crops), out="x"))
    extra = make_crops(tmp_path / "e", people=12, size=16, seed=9)  # the same ids, other pixels
    with pytest.raises(ConfigError, match="photos of .* validation person"):
        prepare_data(TrainConfig(crops=str(crops), out="x", extra=[str(extra)]))
    rows = [r for r in read_manifest(extra) if base.split[r["person_id"]] == "train"]
    write_manifest(extra, rows, read_meta(extra))
    data = prepare_data(TrainConfig(crops=str(crops), out="x", extra=[str(extra)]))
    assert data.split == base.split and data.extra == len(rows)
    assert {r["person_id"] for r in data.train_rows[-data.extra:]} == {f"extra1:{r['person_id']}" for r in rows}


def test_a_validation_set_of_few_people_is_warned_about(tmp_path):
    """A single run warns of its few validation people; a k-fold run of few people warns once of its
    out-of-fold score (every person validates once), never of each fold's share."""
    from classify.metrics import FEW_VAL_PEOPLE
    from classify.training.config import TrainConfig
    from classify.training.train import fit
    from tests.conftest import make_crops

    small = make_crops(tmp_path / "s", people=20, size=8)
    fast = dict(img_size=16, epochs=1, workers=0, weights="none", device="cpu", preset="none", model="resnet18")
    said: list[str] = []
    one = fit(TrainConfig(crops=str(small), out=str(tmp_path / "one"), **fast), warn=said.append)
    assert [w for w in one["warnings"] if w.startswith("validation holds 4 people")] and FEW_VAL_PEOPLE > 4
    assert [w for w in said if w.startswith("validation holds 4 people")]
    twelve = make_crops(tmp_path / "t", people=12, size=8)
    k = fit(TrainConfig(crops=str(twelve), out=str(tmp_path / "k"), folds=3, fold="all", **fast), warn=said.append)
    assert [w for w in k["warnings"] if w.startswith("the out-of-fold score holds 12 people")]
    assert not [w for w in k["warnings"] if w.startswith("validation holds")]
    # the temperature is fitted on those people too, and says so
    assert one["calibration"]["people"] == 4 and one["calibration"]["caution"].startswith("the temperature's fit holds 4")
    assert k["calibration"]["people"] == 12 and "holds 12 people" in k["calibration"]["caution"]
    big = make_crops(tmp_path / "b", people=120, size=8)
    many = fit(TrainConfig(crops=str(big), out=str(tmp_path / "many"), val_ratio=0.2, **fast), warn=said.append)
    assert not [w for w in many["warnings"] if "people: a score from so few" in w]
    assert many["calibration"]["people"] == 24 and "caution" not in many["calibration"]


def test_groups_put_one_humans_people_on_one_side_and_change_nothing_without_them():
    """--groups: the people of one group (the same human under several ids) are one unit of the split, in a
    single split and in every fold; people outside any group keep the split they had without the option."""
    rows = _rows(120)
    for kw in ({"val_ratio": 0.2}, {"folds": 4, "fold": 1}):
        plain = split_persons(rows, seed=5, **kw)
        assert split_persons(rows, seed=5, groups={}, **kw) == plain
        # five people of one human, chosen so that the plain split cuts them apart
        val = [p for p, s in plain.items() if s == "val"][:2]
        train = [p for p, s in plain.items() if s == "train"][:3]
        groups = {p: "h1" for p in val + train}
        grouped = split_persons(rows, seed=5, groups=groups, **kw)
        assert len({grouped[p] for p in groups}) == 1
        assert set(grouped) == set(plain)
    folds = [split_persons(rows, seed=5, folds=4, fold=k, groups=groups) for k in range(4)]
    held = [k for k, f in enumerate(folds) if f[val[0]] == "val"]
    assert len(held) == 1 and all(folds[held[0]][p] == "val" for p in groups)  # one fold holds the whole group


def test_a_groups_file_is_read_and_checked(tmp_path):
    import pytest

    from classify.data.dataset import prepare_data, read_groups
    from classify.errors import ConfigError
    from classify.training.config import TrainConfig
    from tests.conftest import make_crops

    f = tmp_path / "groups.csv"
    f.write_text("person_id,group\n0001,a\n0002,a\n0003,b\n")
    assert read_groups(f, {"0001", "0002", "0003", "0004"}) == {"0001": "a", "0002": "a", "0003": "b"}
    for text, message in (("id,group\n0001,a\n", "needs the columns person_id,group"),
                          ("person_id,group\n0009,a\n", r"1 person id\(s\) the crops do not hold \(0009\)"),
                          ("person_id,group\n0001,a\n0001,b\n", r"in two groups \(0001\)"),
                          ("person_id,group\n0001,\n", "without a person_id or group")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_groups(f, {"0001", "0002"})
    with pytest.raises(ConfigError, match="no such file"):
        TrainConfig(crops="c", out="x", groups=str(tmp_path / "none.csv")).check()
    crops = make_crops(tmp_path / "c", people=30, size=8)
    f.write_text("person_id,group\n" + "".join(f"{p:04d},twins\n" for p in range(0, 30, 3)))
    data = prepare_data(TrainConfig(crops=str(crops), out="x", folds=3, fold=0, groups=str(f)))
    assert len({data.split[f"{p:04d}"] for p in range(0, 30, 3)}) == 1
    assert data.groups == {"file": str(f), "groups": 1, "people": 10}


def test_a_person_only_the_fixes_made_usable_joins_its_groups_side(tmp_path):
    """A person with no known gender is in no split; --label-fixes makes it usable and it trains, unless its
    group (--groups) sits on the validation side, where it joins the group: one human is never on both sides."""
    import csv

    from classify.data.dataset import prepare_data
    from classify.training.config import TrainConfig
    from preprocess.manifest import read_meta, write_manifest, read_manifest
    from tests.conftest import make_crops

    crops = make_crops(tmp_path / "c", people=30, size=8)
    rows = read_manifest(crops)
    for r in rows:
        if r["person_id"] == "0007":
            r["gender"], r["label"] = -1, -1
    write_manifest(crops, rows, read_meta(crops))
    fixes = tmp_path / "fixes.csv"
    with open(fixes, "w", newline="") as f:
        csv.writer(f).writerows([["image_id", "field", "value"]] +
                                [[r["image_id"], "gender", "male"] for r in rows if r["person_id"] == "0007"])
    groups = tmp_path / "groups.csv"
    groups.write_text("person_id,group\n0007,h\n0012,h\n")
    sides = []
    for k in range(3):
        base = prepare_data(TrainConfig(crops=str(crops), out="x", folds=3, fold=k, label_fixes=str(fixes)))
        assert base.split["0007"] == "train"  # in no split: it trains in every fold
        grouped = prepare_data(TrainConfig(crops=str(crops), out="x", folds=3, fold=k, label_fixes=str(fixes),
                                           groups=str(groups)))
        assert grouped.split["0007"] == grouped.split["0012"]
        sides.append(grouped.split["0007"])
    assert sorted(sides) == ["train", "train", "val"]  # validated in its group's one fold
