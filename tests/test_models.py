"""Every registered model: its output dict; freezing that really freezes; the attention model's gradients."""
import pytest
import torch

from classify.losses import MultiTaskLoss, make_loss
from classify.models import compose_task_logits, create_model, freeze_backbone, list_models, model_kwargs
from classify.errors import ConfigError


@pytest.mark.parametrize("name", list_models())
def test_every_model_returns_18_class_logits(name):
    torch.manual_seed(0)
    model = create_model(name, **model_kwargs(name)).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["label"].shape == (2, 18)
    if name == "attention":
        assert out["mask"].shape == (2, 3) and out["gender"].shape == (2, 2) and out["age"].shape == (2, 3)
    assert model.num_features == model.forward_features(torch.randn(1, 3, 64, 64)).shape[1]


@pytest.mark.parametrize("name", ["resnet18", "attention"])
def test_freeze_backbone_trains_only_the_head(name):
    """After a real optimisation step, no backbone parameter or BatchNorm statistic moved, and the head did.
    (A `require_grad` typo, or BatchNorm left in train mode, fails this.)"""
    torch.manual_seed(0)
    model = create_model(name, **model_kwargs(name))
    freeze_backbone(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    crit = MultiTaskLoss(make_loss("ce"), ("label", "mask", "gender", "age") if name == "attention" else ("label",))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):
        loss, _ = crit(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 5, 11, 17]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    backbone = [k for k in after if k.startswith("backbone.")]
    head = [k for k in after if not k.startswith("backbone.") and after[k].is_floating_point()]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)
    assert any(not torch.equal(before[k], after[k]) for k in head)
    assert all(not p.requires_grad for p in model.backbone.parameters())


def test_attention_model_sends_gradients_to_all_three_branches():
    torch.manual_seed(0)
    model = create_model("attention", backbone="resnet18")
    out = model(torch.randn(3, 3, 64, 64))
    out["label"].sum().backward()  # the 18-class head alone must reach every branch (through attention)
    for t in ("mask", "gender", "age"):
        g = model.branches[t][1].weight.grad
        assert g is not None and g.abs().sum() > 0
    assert model.attn_weights.shape == (3, 3, 3)


def test_composed_task_logits_follow_the_label_layout():
    mask = torch.tensor([[0.0, 5.0, 0.0]])
    gender = torch.tensor([[0.0, 5.0]])
    age = torch.tensor([[0.0, 0.0, 5.0]])
    composed = compose_task_logits(mask, gender, age)
    assert composed.argmax().item() == 6 * 1 + 3 * 1 + 2
    assert torch.allclose(composed.exp().sum(), torch.tensor(1.0))


def test_unknown_model_and_missing_weights_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("resnet999")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ConfigError, match=r"resnet18-f37072fd\.pth.*torch hub cache|Place resnet18"):
        create_model("resnet18", weights="imagenet")


def test_weights_from_a_local_file_are_loaded(tmp_path):
    torch.manual_seed(1)
    src = create_model("resnet18")
    torch.save(src.backbone.net.state_dict(), tmp_path / "w.pth")  # torchvision naming, no 'net.' prefix
    dst = create_model("resnet18", weights=str(tmp_path / "w.pth"))
    assert torch.equal(dst.backbone.net.conv1.weight, src.backbone.net.conv1.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="lacks"):
        create_model("resnet18", weights=str(tmp_path / "bad.pth"))


def test_imagenet_weights_come_from_the_hub_cache_and_auto_uses_them_when_present(tmp_path, monkeypatch):
    from classify.models import imagenet_weights_file, resolve_weights

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert resolve_weights("auto", "resnet18") == "none"
    torch.manual_seed(5)
    src = create_model("resnet18")
    path = imagenet_weights_file("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(src.backbone.net.state_dict(), path)
    assert resolve_weights("auto", "resnet18") == "imagenet"
    model = create_model("attention", weights="imagenet", backbone="resnet18")
    assert torch.equal(model.backbone.net.layer4[1].conv2.weight, src.backbone.net.layer4[1].conv2.weight)
