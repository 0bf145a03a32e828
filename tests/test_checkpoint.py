"""Checkpoints describe themselves, round-trip, and can never run code when loaded."""
import pickle

import pytest
import torch

from classify.checkpoint import load_checkpoint, save_checkpoint
from classify.errors import CheckpointError
from classify.models import create_model
from classify.predict import load_model


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
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/maskcls_pwned",))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "maskcls-checkpoint", "payload": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refused|cannot be loaded"):
        load_checkpoint(path)
    import os
    assert not os.path.exists("/tmp/maskcls_pwned")


def test_foreign_and_corrupt_files_are_clear_errors(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a maskcls checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "absent.pt")
