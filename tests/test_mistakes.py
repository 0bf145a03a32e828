"""Every user mistake the README lists: one `error:` line on stderr, exit code 1, no traceback, and
no file changed in any folder the command was pointed at. Each runs as a real process (forked from
the zygote of tests/cli_zygote.py)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, SAMPLES, make_crops, make_person

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Folders and files the mistakes point at: crops, a finished run, raw photos, wrong files."""
    from classify.models.nets import Backbone
    from classify.training.train import TrainConfig, fit

    w = tmp_path_factory.mktemp("world")
    make_crops(w / "crops", people=12)
    fit(TrainConfig(crops=str(w / "crops"), out=str(w / "run"), epochs=1, img_size=32, workers=0, weights="none",
                    device="cpu", preset="none", val_ratio=0.25), warn=lambda m: None)
    make_person(w / "raw" / "images", "000001_female_Asian_45")
    (w / "download" / "train" / "images").mkdir(parents=True)
    (w / "download" / "eval" / "images").mkdir(parents=True)
    (w / "download" / "eval" / "info.csv").write_text("ImageID,ans\n")
    (w / "nophotos" / "images" / "000001_female_Asian_45").mkdir(parents=True)
    (w / "nophotos" / "images" / "000001_female_Asian_45" / "notes.txt").write_text("no photo here")
    torch.save(Backbone("resnet34").net.state_dict(), w / "resnet34.pth")
    (w / "weights.json").write_text('{"conv1.weight": [1, 2]}')
    (w / "model.json").write_text('{"format": "maskcls-checkpoint"}')
    (w / "model.txt").write_text("101\n")
    (w / "afile.txt").write_text("a file where a folder is wanted\n")
    (w / "a.onnx").write_bytes(b"")  # two exported models where one graph is expected
    (w / "b.onnx").write_bytes(b"")
    (w / "out").mkdir()
    (w / "bad.toml").write_text('epochs = "10"\n')
    (w / "fix.csv").write_text("image_id,field,value\n0000/mask1,mask,7\n")
    from preprocess import CropConfig, crop_dataset
    from tests.conftest import FakeDetector

    crop_dataset(w / "raw", w / "rawcrops", CropConfig(size=48), detector=FakeDetector())
    make_person(w / "raw2" / "images", "000002_male_Asian_30")
    (w / "x[" / "y[" / "]").mkdir(parents=True)  # the path x[/y[/] : a MarkupError traceback before
    (w / "br[red]x").mkdir()
    (w / "badspace.toml").write_text("[lrr]\nlow = 0.1\nhigh = 0.2\n")
    (w / "badrange.toml").write_text("[lr]\nlow = 0.1\nhigh = 0.01\n")
    (w / "badchoice.toml").write_text('[loss]\nchoices = ["wce", "hinge"]\n')
    (w / "evalraw" / "images").mkdir(parents=True)
    (w / "evalraw" / "info.csv").write_text("ImageID,ans\na.jpg,0\n")
    (w / "evalraw" / "images" / "a.jpg").write_bytes((w / "raw" / "images" / "000001_female_Asian_45" / "mask1.jpg").read_bytes())
    return w


# (arguments with {w} for the world folder, words the error line must contain)
MISTAKES = [
    ("crop {w}/raw --out {w}/out/c --size 0", "--size 0: must be in 32..4096"),
    ("crop {w}/raw --out {w}/out/c --size -5", "--size -5: must be in 32..4096"),
    ("crop {w}/raw --out {w}/out/c --detect-side -5", "--detect-side -5: must be 0 (full size) or 48..8192"),
    ("crop {w}/raw --out {w}/out/c --batch-size 0", "--batch-size 0: must be >= 1"),
    ("crop {w}/raw --out {w}/out/c --device gpu", "--device 'gpu': choose auto, cpu, cuda or cuda:N"),
    ("crop {w}/raw --out {w}/out/c --margin -1", "--margin -1.0: must be in 0..2"),
    ("crop {w}/raw --out {w}/out/c --workers -1", "--workers -1: must be >= 1"),
    ("crop {w}/raw --out {w}/out/c --min-face 3", "--min-face 3.0: must be in (0, 1]"),
    ("crop {w}/download --out {w}/out/c", "is the competition download (it holds train/ and eval/): crop"),
    ("crop {w}/raw --out {w}/out/c --prior {w}/out", "neither a crops folder (no crops.json) nor a model"),
    ("crop {w}/raw --out {w}/out/c --prior {w}/model.json", "is text (JSON?), not a PyTorch file"),
    ("train {w}/crops --out {w}/out/r --synth-mask 1.5", "--synth-mask 1.5: must be in [0, 1] (a probability)"),
    ("train {w}/crops --out {w}/out/r --mix hcutmix", "--mix 'hcutmix': choose one of none, cutmix, mixup, vcutmix"),
    ("train {w}/crops --out {w}/out/r --extra {w}/raw", "--extra"),
    ("pseudo-label {w}/run {w}/crops --out {w}/out/p --min-prob 0", "--min-prob 0.0: must be in (0, 1]"),
    ("audit {w}/run --out {w}/out/a", "is a single run: audit judges each photo by a model that never trained on it"),
    ("audit {w}/run --out {w}/out/a --min-score 2", "--min-score 2.0: must be in [0, 1]"),
    ("pseudo-label {w}/crops --out {w}/out/p", "give at least one checkpoint and then the folder to pseudo-label"),
    ("pseudo-label {w}/run {w}/crops --out {w}/crops", "already holds a crops folder; give a new --out"),
    ("crop {w}/nophotos --out {w}/out/c", "holds 1 folder(s) but no photo"),
    ("train {w}/crops --out {w}/out/r --workers -1", "--workers -1: must be >= 0"),
    ("train {w}/crops --out {w}/out/r --lr -1", "--lr -1.0: must be > 0"),
    ("train {w}/crops --out {w}/out/r --old 20", "--old 20: must be in 31..120"),
    ("train {w}/crops --out {w}/out/r --epochs 0", "--epochs 0: must be >= 1"),
    ("train {w}/crops --out {w}/out/r --model resnet18 --weights {w}/resnet34.pth --img-size 32",
     "does not fit resnet18: 96 not in resnet18 (layer1.2.conv1.weight"),
    ("train {w}/crops --out {w}/out/r --weights {w}/weights.json --img-size 32", "is text (JSON?), not a PyTorch file"),
    ("train {w}/crops --out {w}/run --epochs 1", "already holds a run (last.pt, best.pt, config.json): add --resume"),
    ("train {w}/raw --out {w}/out/r", "holds raw photos, not crops (it has no manifest.csv): crop them first"),
    ("train {w}/crops --out {w}/out/r --accum 0", "--accum 0: must be >= 1"),
    ("train {w}/crops --out {w}/out/r --ema 1.5", "--ema 1.5: must be in [0, 1)"),
    ("train {w}/crops --out {w}/out/r --warmup -1", "--warmup -1.0: must be >= 0"),
    ("train {w}/crops --out {w}/out/r --patience -2", "--patience -2: must be >= 0 (0: off)"),
    ("train {w}/crops --out {w}/out/r --val-old 20", "--val-old 20: must be in 31..120"),
    ("train {w}/crops --out {w}/out/r --drop-ages-near -1", "--drop-ages-near -1: must be in 0..10"),
    ("train {w}/crops --out {w}/out/r --folds 5 --fold x", "--fold 'x': must be all or a fold number"),
    ("train {w}/crops --out {w}/out/r --folds 5 --fold 7", "--fold 7: must be all or in 0..4"),
    ("train {w}/crops --out {w}/out/r --weights IMAGENET9K", "--weights IMAGENET9K: resnet18 has the weights sets"),
    ("train {w}/crops --out {w}/out/r --model vit_b_16 --img-size 64 --weights none",
     "vit_b_16 cannot take --img-size 64"),
    ("predict {w}/run {w}/crops --out {w}/out/s.csv --vote maybe", "--vote 'maybe': choose soft or hard"),
    ("predict {w}/out {w}/crops --out {w}/out/s.csv", "is a folder without best.pt or fold*/best.pt"),
    ("predict {w}/run/best.pt {w}/crops --out {w}/out/s.csv --tta 9", "--tta 9: must be 1..4 views"),
    ("predict {w}/run/best.pt {w}/crops --out {w}/out/s.csv --tta 0", "--tta 0: must be 1..4 views"),
    ("predict {w}/run/best.pt {w}/crops --out {w}/out/s.csv --batch-size 0", "--batch-size 0: must be >= 1"),
    ("predict {w}/run/best.pt {w}/crops --out {w}/out/s.csv --workers -1", "--workers -1: must be >= 0"),
    ("predict {w}/model.json {w}/crops --out {w}/out/s.csv", "model.json is text (JSON?), not a PyTorch file"),
    ("predict {w}/model.txt {w}/crops --out {w}/out/s.csv", "model.txt is not a PyTorch file (it starts with text"),
    ("predict {w}/resnet34.pth {w}/crops --out {w}/out/s.csv", "a bare state dict: pass it to `maskcls train --weights`"),
    ("evaluate {w}/run/best.pt {w}/crops --tta 5", "--tta 5: must be 1..4 views"),
    ("compare {w}/run --out {w}/out/cmp", "give two or more run folders to compare"),
    ("compare {w}/run {w}/crops --out {w}/out/cmp", "crops is not a `maskcls train` run folder (no config.json)"),
    ("report {w}/crops {w}/run --out {w}/out/rep --per-class 0", "--per-class 0: must be in 1..50"),
    ("report {w}/crops {w}/run --out {w}/out/rep --per-class -3", "--per-class -3: must be in 1..50"),
    ("train {w}/crops --out {w}/out/r --config {w}/bad.toml", "bad.toml: epochs = '10': must be an integer"),
    ("train {w}/crops --out {w}/out/r --label-fixes {w}/fix.csv --img-size 32", "line 2: mask '7' is outside 0..2"),
    ("train {w}/crops --out {w}/out/r --folds 20 --fold all", "--folds 20: more folds than the 12 people"),
    ("train {w}/crops --out {w}/out/r --folds 20 --fold 3", "--folds 20: more folds than the 12 people"),
    ("crop {w}/raw2 --out {w}/rawcrops", "rawcrops holds the crops of"),
    ("crop {w}/raw --out {w}/model.txt", "--out {w}/model.txt is a file: give a folder"),
    ("predict {w}/run {w}/crops --out {w}/out", "--out {w}/out is a folder: give a file name"),
    ("crop {w}/x[/y[/] --out {w}/out/c", "x[/y[/]"),
    ("crop {w}/br[red]x --out {w}/out/c", "br[red]x"),
    ("tune {w}/crops --out {w}/out/t --space {w}/badspace.toml", "--space {w}/badspace.toml: 'lrr' is not a train option"),
    ("tune {w}/crops --out {w}/out/t --space {w}/badrange.toml", "[lr] needs numbers low < high, got low = 0.1, high = 0.01"),
    ("tune {w}/crops --out {w}/out/t --space {w}/badchoice.toml", "loss = 'hinge' cannot train: --loss 'hinge': choose one of"),
    ("tune {w}/crops --out {w}/out/t --trials 0", "--trials 0: must be >= 1"),
    ("tune {w}/crops --out {w}/out/t --lr -1", "--lr -1.0: must be > 0"),
    ("tune {w}/crops --out {w}/out/t --epochs notanumber", "Invalid value for '--epochs'"),
    # the command line itself (typer's boxed usage and exit code 2 before): one line naming the fix
    ("crop {w}/raw --out {w}/out/c --sise 64", "No such option: --sise (Possible options: --size) (cli.py crop --help"),
    ("crop --out {w}/out/c", "Missing argument 'RAW'. (cli.py crop --help lists what it takes)"),
    ("crop {w}/raw --out {w}/out/c --size big", "Invalid value for '--size': Input should be a valid integer"),
    ("export {w}/run", "Missing option '--out' / '-o'. (cli.py export --help"),
    ("crpo {w}/raw --out {w}/out/c", "No such command 'crpo'. Did you mean 'crop'"),
    ("--verbose crop {w}/raw --out {w}/out/c", "No such option: --verbose (Possible options: --version) (cli.py --help"),
    ("tune {w}/crops --out {w}/out/t --storage nonsense://user:secret@host/db", "--storage nonsense://***@host/db: not a database URL"),
    ("train {w}/raw/images --out {w}/out/r", "holds raw photos (person folders), not crops: crop them first with "
                                             "`maskcls crop {w}/raw/images --out CROPS`"),
    ("predict {w}/run {w}/evalraw/images --out {w}/out/s.csv", "holds the photos of an eval folder: give its parent "
                                                               "{w}/evalraw (it holds info.csv)"),
    ("predict {w}/a.onnx {w}/b.onnx {w}/crops --out {w}/out/s.csv", "give one exported .onnx model"),
    ("pseudo-label {w}/a.onnx {w}/b.onnx {w}/crops --out {w}/out/p", "give one exported .onnx model"),
    ("evaluate {w}/a.onnx {w}/b.onnx {w}/crops", "give one exported .onnx model (export several checkpoints into one graph)"),
    # every output option, checked before any work
    ("crop {w}/raw --out {w}/afile.txt", "--out {w}/afile.txt is a file: give a folder"),
    ("train {w}/crops --out {w}/afile.txt --epochs 1", "--out {w}/afile.txt is a file: give a folder"),
    ("report {w}/crops --out {w}/afile.txt", "--out {w}/afile.txt is a file: give a folder"),
    ("compare {w}/run {w}/run --out {w}/afile.txt", "--out {w}/afile.txt is a file: give a folder"),
    ("tune {w}/crops --out {w}/afile.txt", "--out {w}/afile.txt is a file: give a folder"),
    ("explain {w}/run {w}/model.txt --out {w}/afile.txt", "--out {w}/afile.txt is a file: give a folder"),
    ("pseudo-label {w}/run {w}/crops --out {w}/afile.txt", "--out {w}/afile.txt is a file: give a folder"),
    ("evaluate {w}/run {w}/crops --confusion {w}/crops", "--confusion {w}/crops is a folder: give a file name"),
    ("predict {w}/run {w}/crops --out {w}/afile.txt/s.csv", "{w}/afile.txt is a file, so nothing can be written below it"),
    ("export {w}/run --out {w}/crops", "--out {w}/crops is a folder: give a file name"),
    ("explain {w}/a.onnx {w}/model.txt --out {w}/out/e", "explain needs a checkpoint (Grad-CAM follows the torch"),
    # an output that would destroy an input or another output (each did, with exit 0)
    ("predict {w}/run {w}/crops --out {w}/out/s.csv --probs {w}/out/s.csv", "--out and --probs name the same file"),
    ("predict {w}/run {w}/crops --out {w}/out/s.csv --review {w}/out/./s.csv", "--out and --review name the same file"),
    ("predict {w}/a.onnx {w}/crops --out {w}/a.onnx", "--out {w}/a.onnx is this command's input {w}/a.onnx"),
    ("predict {w}/run {w}/crops --out {w}/run/best.pt", "--out {w}/run/best.pt is part of {w}/run, which this command reads"),
    ("predict {w}/run {w}/evalraw --out {w}/evalraw/info.csv", "is part of {w}/evalraw, which this command reads"),
    ("predict {w}/run {w}/crops --out {w}/b.onnx", "--out {w}/b.onnx is a model file: writing there would destroy it"),
    ("evaluate {w}/run {w}/crops --confusion {w}/crops/manifest.csv", "is part of {w}/crops, which this command reads"),
    ("predict {w}/run {w}/evalraw --out {w}/out/s.csv --crops {w}/rawcrops",
     "--crops {w}/rawcrops holds the crops of {w}/raw, not of {w}/evalraw: give another --crops folder"),
    ("export {w}/run --out {w}/run/best.pt", "--out {w}/run/best.pt is part of {w}/run, which this command reads"),
    ("train {w}/crops --out {w}/crops --epochs 1", "--out {w}/crops is the crops folder this run trains on"),
    ("train {w}/crops --out {w} --epochs 1", "--out {w} holds the crops folder this run trains on"),
    ("train {w}/crops --out {w}/raw --epochs 1", "{w}/raw holds images, which no run writes"),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("args,words", MISTAKES, ids=[m[0].split(" --")[0].replace("{w}/", "") + " " +
                                                      " ".join(m[0].split(" --")[2:])[:30] for m in MISTAKES])
def test_a_user_mistake_is_one_line_exit_1_and_changes_nothing(world, cli_run, args, words):
    before = _snapshot(world)
    res = cli_run(*args.format(w=world).split(), timeout=300)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith("error: ") and words.format(w=world) in " ".join(lines[0].split()), lines[0]
    assert _snapshot(world) == before  # nothing written, removed or changed anywhere it was pointed at


def _unwritable_folder() -> Path | None:
    """An empty folder that exists and that even root cannot write into (sysfs), or None. Empty: train refuses,
    before writing, a folder that holds anything no run writes."""
    import os
    import tempfile

    for parent in (Path("/sys/kernel"), Path("/sys/class")):
        try:
            folders = sorted(p for p in parent.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            continue
        for d in folders:
            try:
                if any(d.iterdir()):
                    continue
            except OSError:  # not even listed
                continue
            try:
                fd, tmp = tempfile.mkstemp(dir=d)
            except FileNotFoundError:
                continue
            except OSError:
                return d
            os.close(fd)
            os.unlink(tmp)
    return None


def test_an_unwritable_out_is_one_line_naming_the_file_not_its_temporary_name(world):
    out = _unwritable_folder()
    if out is None:
        pytest.skip("no folder here that root cannot write into")
    res = subprocess.run([sys.executable, str(REPO / "cli.py"), "train", str(world / "crops"), "--out", str(out),
                          "--epochs", "1", "--img-size", "32", "--workers", "0", "--weights", "none"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert lines[0].startswith(f"error: cannot write or read {out}/config.json: Permission denied"), lines[0]
    assert ".tmp" not in lines[0]


def test_an_unwritable_file_is_named_as_the_user_knows_it_not_by_its_temporary_name():
    from cli_commands import common as cli

    assert cli._user_path("/ro/out/.manifest.csv.ab12_cd.tmp") == "/ro/out/manifest.csv"
    assert cli._user_path("/ro/out/best.pt") == "/ro/out/best.pt"


def test_the_sample_data_still_crops(tmp_path):
    """The checks refuse mistakes, not the data they exist for."""
    res = subprocess.run([sys.executable, str(REPO / "cli.py"), "crop", str(SAMPLES / "eval"), "--out", str(tmp_path / "e")],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
