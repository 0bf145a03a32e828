"""Crops on the right face: the person's own face when another face outscores it, a learned prior for
lone photos (saved in crops.json and the checkpoint, used by predict), and labels rebuilt every run."""
import json
import math

import numpy as np
import pytest

from classify.checkpoint import load_checkpoint
from classify.inference.predictor import predict
from classify.training.train import TrainConfig, fit
from preprocess import CropConfig, crop_dataset
from preprocess.manifest import read_manifest, read_meta
from preprocess.subject import DEFAULT_PRIOR, Prior, choose_for_person, choose_lone
from classify.inference.card import card_of
from tests.conftest import save_rgb

CFG = CropConfig(size=48, workers=2, device="cpu")
SUBJECT = (130, 170, 250, 290)      # the person's face, in every photo (fake detector: a bright square)
BYSTANDER = (0, 20, 120, 160)       # a larger face at the left edge: area x score beats the masked subject's


def scene(*faces, seed=0):
    """A dark 384x512 photo with bright squares: faces = ((x1, y1, x2, y2), brightness) ..."""
    img = np.random.default_rng(seed).integers(0, 90, size=(512, 384, 3), dtype=np.uint8)
    for (x1, y1, x2, y2), level in faces:
        img[y1:y2, x1:x2] = level
    return img


def test_pure_choice_keeps_the_subject_where_a_bystander_outscores_it():
    """Seven photos: the bystander (larger, 0.99) in all; the subject found at 0.99 unmasked, lower
    masked, and not at all in two photos. Every photo gets the subject's place."""
    w, h = 384, 512
    by = ((0.0, 40.0, 150.0, 190.0), 0.99, "ok", None)

    def subj(dx, score):
        return ((130.0 + dx, 170.0, 250.0 + dx, 290.0), score, "ok", None)

    photos = [([by, subj(2, 0.80)], w, h), ([by, subj(-3, 0.75)], w, h), ([by], w, h), ([by], w, h),
              ([by, subj(1, 0.9)], w, h), ([by, subj(0, 0.97)], w, h), ([subj(0, 0.99), by], w, h)]
    choices = choose_for_person(photos, DEFAULT_PRIOR)
    for (cands, _, _), c in zip(photos, choices):
        assert abs(c.box[0] - 130) <= 3 and abs(c.box[2] - 250) <= 3, c
        if len(cands) == 2:
            assert c.status == "ok" and cands[c.index] is not by
        else:
            assert c.status == "person_box" and "passed over the face at (0, 40, 150, 190)" in c.reason
    # the plain rule (largest x most confident) takes the bystander in six photos of seven
    assert "the subject, not the larger or higher-scoring face" in choices[0].reason


def test_crop_stage_crops_the_person_not_the_bystander(tmp_path, fake_detector):
    raw = tmp_path / "raw" / "images" / "000001_female_Asian_45"
    for k, stem in enumerate(["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]):
        faces = [(BYSTANDER, 255)]
        if stem != "mask3":  # the masked subject is missed in one photo
            faces.append((SUBJECT, 255 if stem == "normal" else 225))  # masked: a dimmer, lower-scoring face
        save_rgb(raw / f"{stem}.jpg", scene(*faces, seed=k))
    res = crop_dataset(tmp_path / "raw", tmp_path / "c", CFG, detector=fake_detector)
    rows = {r["image_id"].split("/")[1]: r for r in read_manifest(tmp_path / "c")}
    for stem, r in rows.items():
        assert (r["x1"], r["y1"], r["x2"], r["y2"]) == pytest.approx(SUBJECT, abs=1), stem
        assert r["faces"] == (1 if stem == "mask3" else 2)
    assert rows["mask3"]["status"] == "person_box" and "passed over the face at (0, 20, 120, 160)" in rows["mask3"]["reason"]
    assert rows["mask1"]["status"] == "ok" and "not the larger or higher-scoring face" in rows["mask1"]["reason"]
    assert res.counts["person_box"] == 1 and res.counts["ok"] == 6
    # the crop shows the subject (its centre is the subject's square), not the brighter bystander
    from preprocess.imageio import read_crop
    crop = read_crop(tmp_path / "c" / rows["mask1"]["crop"])
    assert 200 < crop[20:28, 20:28].mean() < 245


def _people(images, box, n=3):
    for p in range(n):
        for k, stem in enumerate(["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]):
            save_rgb(images / f"00000{p + 1}_male_Asian_{25 + 20 * p}" / f"{stem}.jpg",
                     scene((box, 255), seed=10 * p + k))


CORNER = (40, 60, 140, 160)  # where this training set's faces sit: far from the built-in portrait prior


def test_the_training_prior_is_saved_and_predict_crops_lone_photos_with_it(tmp_path, fake_detector):
    _people(tmp_path / "train" / "images", CORNER)
    crops = tmp_path / "crops"
    crop_dataset(tmp_path / "train", crops, CFG, detector=fake_detector)
    prior = Prior.from_dict(read_meta(crops)["prior"])
    assert prior.n == 21 and prior.source == "learned from 21 photos"
    assert prior.mean == pytest.approx([90 / 384, 110 / 512, math.log(100 / 384)], abs=1e-3)
    # an eval photo with two faces: a large central one (what the built-in prior likes) and one where
    # the training faces sit
    ev = tmp_path / "eval"
    save_rgb(ev / "images" / "a.jpg", scene(((150, 200, 310, 360), 255), (CORNER, 240)))
    (ev / "info.csv").write_text("ImageID,ans\na.jpg,0\n")
    plain = crop_dataset(ev, tmp_path / "plain", CFG, detector=fake_detector).rows[0]
    assert (plain["x1"], plain["y1"]) == (150, 200)  # without the training prior: the central face
    run = tmp_path / "run"
    fit(TrainConfig(crops=str(crops), out=str(run), model="resnet18", img_size=32, epochs=1, workers=0,
                    weights="none", device="cpu", preset="none", val_ratio=0.34), warn=lambda m: None)
    ckpt = load_checkpoint(run / "best.pt")
    assert card_of(ckpt).crop["prior"] == read_meta(crops)["prior"]
    predict([run / "best.pt"], ev, tmp_path / "sub.csv", cache=tmp_path / "cache", device="cpu", workers=0,
            detector=fake_detector)
    (row,) = read_manifest(tmp_path / "cache")
    assert (row["x1"], row["y1"], row["x2"], row["y2"]) == pytest.approx(CORNER, abs=1)
    assert row["status"] == "ok" and "not the larger" in row["reason"]
    assert read_meta(tmp_path / "cache")["prior_used"] == read_meta(crops)["prior"]
    # `maskcls crop EVAL --prior X` (issue 34, item 1: it refused every checkpoint with a card): a run
    # folder, its best.pt and the training crops folder give the prior predict used, and the same box
    from classify.inference.cropping import prior_of

    for k, given in enumerate((run, run / "best.pt", crops)):
        prior = prior_of(given)
        assert prior.to_dict() == read_meta(crops)["prior"]
        (mine,) = crop_dataset(ev, tmp_path / f"prior{k}", CFG, detector=fake_detector, prior=prior).rows
        assert (mine["x1"], mine["y1"], mine["x2"], mine["y2"]) == (row["x1"], row["y1"], row["x2"], row["y2"])


def test_serve_crops_an_upload_with_the_models_learned_prior(tmp_path, fake_detector):
    """The same two-face scene through serve's Engine (issue 29 a): the exported model carries the prior
    learned from its training crops, and serve chooses the face where the training faces sat, not the
    central one the built-in prior likes (one-face photos never let the prior decide)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pytest.importorskip("fastapi")
    from classify.deploy.export import export
    from classify.deploy.serve import Engine
    from classify.inference.onnx_model import OnnxModel

    _people(tmp_path / "train" / "images", CORNER)
    crop_dataset(tmp_path / "train", tmp_path / "crops", CFG, detector=fake_detector)
    fit(TrainConfig(crops=str(tmp_path / "crops"), out=str(tmp_path / "run"), model="resnet18", img_size=32, epochs=1,
                    workers=0, weights="none", device="cpu", preset="none", val_ratio=0.34), warn=lambda m: None)
    export([tmp_path / "run" / "best.pt"], tmp_path / "m.onnx")
    model = OnnxModel(tmp_path / "m.onnx")
    two_faces = scene(((150, 200, 310, 360), 255), (CORNER, 240))
    (served,) = Engine(model, detector=fake_detector).predict([two_faces])
    assert served["box"] == pytest.approx(CORNER, abs=1) and served["status"] == "ok"
    # the built-in prior, given the same scene, takes the central face: the learned prior decided
    engine = Engine(model, detector=fake_detector)
    engine.prior = DEFAULT_PRIOR
    (plain,) = engine.predict([two_faces])
    assert plain["box"][:2] == pytest.approx([150, 200], abs=1)


def test_a_lone_photo_with_no_plausible_face_gets_the_prior_box_not_the_stray_face():
    prior = Prior.learn([(CORNER, 384, 512)] * 30)
    c = choose_lone([((250.0, 380.0, 330.0, 460.0), 0.99, "ok", None)], 384, 512, prior)
    assert c.status == "prior_box" and c.index is None
    assert c.box == pytest.approx(prior.box(384, 512)) and "passed over the face at (250, 380, 330, 460)" in c.reason
    assert Prior.from_dict(json.loads(json.dumps(prior.to_dict()))) == prior


def test_editing_labels_csv_is_followed_without_detecting_again(tmp_path, fake_detector):
    raw = tmp_path / "raw"
    lines = ["path,mask,gender,age,person_id"]
    for p in range(2):
        for k, (stem, mask) in enumerate([("a", 0), ("b", 1), ("c", 2)]):
            save_rgb(raw / f"p{p}" / f"{stem}.jpg", scene((SUBJECT, 255), seed=10 * p + k))
            lines.append(f"p{p}/{stem}.jpg,{mask},female,{30 + p},id{p}")
    (raw / "labels.csv").write_text("\n".join(lines) + "\n")
    crop_dataset(raw, tmp_path / "c", CFG, detector=fake_detector)
    photos = fake_detector.photos
    before = {r["source"]: r for r in read_manifest(tmp_path / "c")}
    assert before["p0/a.jpg"]["gender"] == 1 and before["p0/a.jpg"]["person_id"] == "id0"
    # a relabelling: p0 is male and 65, and p1's photos get another person id
    edited = [ln.replace("female,30,id0", "male,65,id0").replace(",id1", ",renamed") for ln in lines]
    (raw / "labels.csv").write_text("\n".join(edited) + "\n")
    res = crop_dataset(raw, tmp_path / "c", CFG, detector=fake_detector)
    after = {r["source"]: r for r in read_manifest(tmp_path / "c")}
    assert res.detected == 0 and fake_detector.photos == photos
    assert (after["p0/a.jpg"]["gender"], after["p0/a.jpg"]["age"], after["p0/a.jpg"]["age_group"],
            after["p0/a.jpg"]["label"]) == (0, 65, 2, 2)
    assert {after[f"p1/{s}.jpg"]["person_id"] for s in "abc"} == {"renamed"}
    assert after["p1/c.jpg"]["label"] == before["p1/c.jpg"]["label"] == 12 + 3 + 1
    for src in after:  # the faces are the cached ones
        assert [after[src][k] for k in ("x1", "y1", "x2", "y2")] == [before[src][k] for k in ("x1", "y1", "x2", "y2")]


def test_the_crop_stamp_check_does_not_load_the_crop_stage():
    """classify reads the manifest and the pack's stamp without importing the detector or OpenCV's DNN nets."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import sys, classify.data.dataset, classify.training.train, classify.study.report\n"
            "print(sorted(m for m in ('preprocess.crop', 'preprocess.detector', 'preprocess.mtcnn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
