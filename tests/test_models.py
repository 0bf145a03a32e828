"""Every model: its output dict; every torchvision backbone without its classifier; freezing that
really freezes; the attention model's gradients and losses."""
import importlib.util

import numpy as np
import pytest
import torch

from classify.errors import ConfigError
from classify.training.losses import MultiTaskLoss, make_loss
from classify.models.nets import (Backbone, compose_task_logits, create_model, freeze_backbone, list_models, model_kwargs,
                             torchvision_models)
from preprocess import labels as L

HAVE_TIMM = importlib.util.find_spec("timm") is not None
# Built for real and run at 64 px: the registered models and one torchvision model of each way of
# ending in a classifier (fc, classifier[-1], a 1x1 conv, aux heads, a Linear inside a head block).
REAL = sorted({"attention", "resnet18", "mobilenet_v2", "efficientnet_b0", "squeezenet1_1", "googlenet",
               "shufflenet_v2_x0_5", "convnext_tiny", "swin_t", "mnasnet0_5"} | set(list_models()) - set(torchvision_models()))
REAL += ["timm/test_convnext.r160_in1k"] if HAVE_TIMM else []


@pytest.mark.parametrize("arch", torchvision_models())
def test_every_torchvision_backbone_ends_in_pooled_features(arch):
    """Every torchvision classification model, its 1000-way classifier removed: features of
    num_features per image, and no 1000-output layer left. Built on the meta device (no memory, no
    compute) where the constructor allows."""
    side = 299 if arch == "inception_v3" else 224
    try:
        with torch.device("meta"):
            b = Backbone(arch).eval()
            f = b(torch.zeros(2, 3, side, side))
    except NotImplementedError:  # a constructor that needs real tensors (RegNet): build it for real, small input
        b = Backbone(arch).eval()
        with torch.no_grad():
            f = b(torch.zeros(2, 3, 64, 64))
    assert tuple(f.shape) == (2, b.num_features)
    assert not any(getattr(m, "out_features", 0) == 1000 or getattr(m, "out_channels", 0) == 1000 for m in b.modules())


@pytest.mark.parametrize("name", REAL)
def test_every_model_returns_18_class_logits(name):
    torch.manual_seed(0)
    model = create_model(name, **model_kwargs(name)).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["label"].shape == (2, 18)
    if name == "attention":
        assert out["mask"].shape == (2, 3) and out["gender"].shape == (2, 2) and out["age"].shape == (2, 3)
    assert model.num_features == model.forward_features(torch.randn(1, 3, 64, 64)).shape[1]


@pytest.mark.parametrize("name", ["resnet18", "attention"] + (["timm/test_convnext.r160_in1k"] if HAVE_TIMM else []))
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


def test_composed_task_logits_agree_with_encode():
    """combine_tasks lays the 18 classes out exactly as encode numbers them."""
    rng = np.random.default_rng(0)
    m, g, a = rng.normal(size=3), rng.normal(size=2), rng.normal(size=3)
    full = L.combine_tasks(m, g, a)
    for label in range(18):
        mm, gg, aa = L.decode(label)
        assert full[L.encode(mm, gg, aa)] == pytest.approx(m[mm] + g[gg] + a[aa])


def test_attention_model_registers_each_parameter_once():
    model = create_model("attention", backbone="resnet18")
    assert len(model.state_dict()) == len(dict(model.named_parameters())) + len(dict(model.named_buffers()))
    assert not any(k.startswith("head.") for k in model.state_dict())


def test_every_task_loss_reaches_the_attention_models_total(tmp_path):
    """The training criterion (built by train.create_criterion for the model) must send gradient to
    each of the 18-class, mask, gender and age outputs: dropping any task's loss fails this."""
    from classify.training.train import TrainConfig, create_criterion

    torch.manual_seed(0)
    for weighting in ("fixed", "uncertainty"):
        cfg = TrainConfig(crops="x", out="y", model="attention", task_weighting=weighting)
        model = create_model("attention", backbone="resnet18")
        crit = create_criterion(cfg, model, np.ones(18))  # one training photo per class
        out = {k: v.detach().requires_grad_(True) for k, v in model(torch.randn(4, 3, 64, 64)).items()}
        total, parts = crit(out, torch.tensor([0, 7, 11, 17]))
        total.backward()
        assert set(parts) == {"label", "mask", "gender", "age"}
        for head in ("label", "mask", "gender", "age"):
            assert out[head].grad is not None and out[head].grad.abs().sum() > 0, (weighting, head)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("resnet999")
    with pytest.raises(ConfigError, match="unknown backbone"):
        create_model("attention", backbone="resnet999")


@pytest.mark.skipif(not HAVE_TIMM, reason="timm (the maskcls[timm] extra) is not installed")
def test_a_timm_model_is_the_attention_models_backbone_too():
    torch.manual_seed(0)
    model = create_model("attention", backbone="timm/test_convnext.r160_in1k").eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["label"].shape == (2, 18) and model.backbone.arch == "timm/test_convnext.r160_in1k"


def test_mixed_precision_is_bf16_where_the_gpu_has_it_else_fp16_and_off_on_the_cpu(monkeypatch):
    from classify.inference.engine import resolve_amp

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))  # an A100 (tests/test_trust: V100, T4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", cuda) == "bf16" and resolve_amp("fp16", cuda) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", cuda) == "fp16" and resolve_amp(True, cuda) == "fp16"  # old configs said True
    assert resolve_amp("auto", cpu) == "off" and resolve_amp("bf16", cpu) == "off" and resolve_amp("off", cuda) == "off"
    with pytest.raises(ConfigError, match="--amp 'fp8'"):
        resolve_amp("fp8", cuda)
