"""Checkpoints describe themselves, round-trip, and can never run code when loaded."""
import pickle
import warnings

import pytest
import torch

from classify.checkpoint import load_checkpoint, save_checkpoint
from classify.errors import CheckpointError
from classify.models.nets import create_model
from classify.inference.torch_backend import load_model


def test_round_trip_restores_model_and_description(tmp_path):
    torch.manual_seed(0)
    model = create_model("attention", backbone="resnet18").eval()
    save_checkpoint(tmp_path / "m.pt", {"model": {"name": "attention", "kwargs": {"backbone": "resnet18"}},
                                        "model_state": model.state_dict(), "img_size": 64, "epoch": 3,
                                        "config": {"old": 58}})
    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["epoch"] == 3 and ckpt["config"]["old"] == 58
    again = load_model(ckpt, torch.device("cpu"))
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(model(x)["label"], again(x)["label"])


class _Evil:
    """Unpickled, it would create `marker`: a file inside the test's own tmp folder, so a regression
    shows in this test and leaves nothing behind for later runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return (os.mkdir, (self.marker,))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    with open(path, "wb") as f:
        pickle.dump({"format": "maskcls-checkpoint", "payload": _Evil(marker)}, f)
    with warnings.catch_warnings(record=True) as seen:  # the one error line, and no torch warning beside it
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="carries Python objects that would run code when loaded; refused"):
            load_checkpoint(path)
    assert not marker.exists()
    assert not [str(w.message) for w in seen], [str(w.message) for w in seen]


def test_foreign_and_corrupt_files_are_clear_errors_each_saying_what_it_is(tmp_path):
    """Each file gets its own message: a test matching any load error would pass a corrupt file as refused."""
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="a PyTorch file but not a maskcls checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"conv1.weight": torch.zeros(2)}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"a bare state dict: pass it to `maskcls train --weights`"):
        load_checkpoint(tmp_path / "bare.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"is not a PyTorch file \(it starts with binary data"):
        load_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "notes.pt").write_text("101\n")
    with pytest.raises(CheckpointError, match=r"is not a PyTorch file \(it starts with text"):
        load_checkpoint(tmp_path / "notes.pt")
    (tmp_path / "c.json").write_text('{"format": "maskcls-checkpoint"}')
    with pytest.raises(CheckpointError, match=r"is text \(JSON\?\), not a PyTorch file"):
        load_checkpoint(tmp_path / "c.json")
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model_state": {"w": torch.zeros(1000)}})
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:700])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "absent.pt")
