"""Models, built by name from a registry. Every model returns a dict of logits per task
(always 'label', the 18 classes; the attention model also 'mask', 'gender', 'age'), and has the same
surface: `backbone`, `head`, `num_features`, `forward_features`. Losses live outside the models.

>>> list_models()
['attention', 'efficientnet_b0', ..., 'resnet50']
>>> model = create_model("resnet18", weights="none")
>>> model(torch.zeros(2, 3, 224, 224))["label"].shape
torch.Size([2, 18])
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from preprocess import labels as L

from .errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
BACKBONES = ("resnet18", "resnet34", "resnet50", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
             "efficientnet_b3")


def register_model(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, weights: str = "none", **kwargs) -> nn.Module:
    """Build a registered model. `weights`: 'none' (random init), 'imagenet' (torchvision's weights from
    the torch hub cache; an error names the file if it is absent), or a path to a state dict file."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    model = _REGISTRY[name](**kwargs)
    if weights != "none":
        model.backbone.load_state_dict(backbone_weights(kwargs.get("backbone", name), weights), strict=False)
    return model


class Backbone(nn.Module):
    """A torchvision classifier with its last layer removed: images → pooled features (B, num_features)."""

    def __init__(self, arch: str, dropout: float | None = None):
        super().__init__()
        if arch not in BACKBONES:
            raise ConfigError(f"unknown backbone {arch!r}; choose one of {', '.join(BACKBONES)}")
        net = getattr(torchvision.models, arch)(weights=None)
        if arch.startswith("resnet"):
            self.num_features = net.fc.in_features
            net.fc = nn.Identity()
        else:
            self.num_features = net.classifier[1].in_features
            net.classifier = nn.Identity()  # dropout moves to our head
        self.net = net
        self.arch = arch
        self.frozen = False

    def train(self, mode: bool = True):
        # A frozen backbone stays in eval mode: its BatchNorm statistics must not drift either.
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def load_state_dict(self, state, strict: bool = True):
        # torchvision checkpoints name layers without our 'net.' prefix and include the old classifier.
        state = {(k if k.startswith("net.") else f"net.{k}"): v for k, v in state.items()}
        own = self.state_dict()
        state = {k: v for k, v in state.items() if k in own}
        missing = [k for k in own if k not in state]
        if missing:
            raise ConfigError(f"the weights file lacks {len(missing)} of {len(own)} {self.arch} tensors "
                              f"(e.g. {missing[0]}): is it for this architecture?")
        return super().load_state_dict(state, strict=True)


class Classifier(nn.Module):
    """Backbone + one linear 18-class head."""

    def __init__(self, backbone: str, num_classes: int = L.NUM_CLASSES, dropout: float = 0.2):
        super().__init__()
        self.backbone = Backbone(backbone)
        self.num_features = self.backbone.num_features
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.num_features, num_classes))

    def forward_features(self, x):
        return self.backbone(x)

    def forward(self, x):
        return {"label": self.head(self.forward_features(x))}


for _arch in BACKBONES:
    register_model(_arch)(lambda _a=_arch, **kw: Classifier(_a, **kw))


def compose_task_logits(mask: torch.Tensor, gender: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
    """(B, 18) log-probabilities of the 18 classes if mask, gender and age were independent given the
    image: log p(m) + log p(g) + log p(a), laid out as label = 6m + 3g + a."""
    lm, lg, la = mask.log_softmax(-1), gender.log_softmax(-1), age.log_softmax(-1)
    return (lm[:, :, None, None] + lg[:, None, :, None] + la[:, None, None, :]).flatten(1)


@register_model("attention")
class MultiTaskAttention(nn.Module):
    """A shared backbone feeding three task branches (mask, gender, age), each with its own head and
    loss; the branches' hidden states, as three tokens, attend to each other (multi-head
    self-attention) and the fused tokens feed the 18-class head.

    The 18-class logits are the fused head's output *plus* `compose_task_logits` of the three task
    heads, so the 18-class prediction is anchored to the task heads: where the task heads are
    confident, the 18-class head can only overrule them with a strong fused signal. `predict` uses
    the 18-class output (the metric is on the 18 classes, and it sees all three tasks at once).
    """

    def __init__(self, backbone: str = "resnet18", hidden: int = 256, heads: int = 4, dropout: float = 0.2,
                 num_classes: int = L.NUM_CLASSES):
        super().__init__()
        self.backbone = Backbone(backbone)
        self.num_features = self.backbone.num_features
        self.tasks = ("mask", "gender", "age")
        self.branches = nn.ModuleDict({t: nn.Sequential(nn.Dropout(dropout), nn.Linear(self.num_features, hidden),
                                                        nn.LayerNorm(hidden), nn.GELU()) for t in self.tasks})
        self.task_heads = nn.ModuleDict({t: nn.Linear(hidden, len(L.TASKS[t])) for t in self.tasks})
        self.task_embed = nn.Parameter(torch.zeros(len(self.tasks), hidden))
        nn.init.normal_(self.task_embed, std=0.02)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.fused_head = nn.Linear(hidden * len(self.tasks), num_classes)
        self.head = nn.ModuleList([self.branches, self.task_heads, self.attn, self.norm, self.fused_head])
        self.attn_weights: torch.Tensor | None = None

    def forward_features(self, x):
        return self.backbone(x)

    def forward(self, x):
        f = self.forward_features(x)
        hidden = [self.branches[t](f) for t in self.tasks]
        out = {t: self.task_heads[t](h) for t, h in zip(self.tasks, hidden)}
        tokens = torch.stack(hidden, dim=1) + self.task_embed  # (B, 3, hidden)
        fused, self.attn_weights = self.attn(tokens, tokens, tokens, need_weights=True)
        fused = self.norm(tokens + fused)
        out["label"] = self.fused_head(fused.flatten(1)) + compose_task_logits(out["mask"], out["gender"], out["age"])
        return out


def freeze_backbone(model: nn.Module) -> None:
    """Freeze every backbone parameter and keep its BatchNorm statistics fixed (eval mode), so that
    a frozen backbone really computes the same function after training. Only the head learns."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.backbone.frozen = True
    model.backbone.eval()


def model_kwargs(name: str, backbone: str | None = None, dropout: float | None = None) -> dict:
    """The constructor arguments a config implies (stored in checkpoints, so predict rebuilds the same model)."""
    kw = {"backbone": backbone or "resnet18"} if name == "attention" else {}
    if dropout is not None:
        kw["dropout"] = dropout
    return kw


# -- pretrained weights -------------------------------------------------------------------------------

def _weights_enum(arch: str):
    return torchvision.models.get_model_weights(arch).DEFAULT


def imagenet_weights_file(arch: str) -> Path:
    """Where torch hub caches torchvision's ImageNet weights for `arch`."""
    url = _weights_enum(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def backbone_weights(arch: str, weights: str) -> dict:
    if weights == "imagenet":
        path = imagenet_weights_file(arch)
        if not path.is_file():
            raise ConfigError(
                f"ImageNet weights for {arch} are not in the torch hub cache and maskcls does not download at run "
                f"time. Place {os.path.basename(path)} (from {_weights_enum(arch).url}) at {path}, or pass "
                f"--weights PATH to a state-dict file, or --weights none for random init.")
    else:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"--weights {weights}: no such file (use imagenet, none, or a path to a state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle safely means: not a usable weights file
        raise ConfigError(f"cannot load weights from {path}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def resolve_weights(weights: str, arch: str) -> str:
    """'auto' → 'imagenet' when the file is cached, else 'none' (the caller prints a warning)."""
    if weights != "auto":
        return weights
    return "imagenet" if imagenet_weights_file(arch).is_file() else "none"
