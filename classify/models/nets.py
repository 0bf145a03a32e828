"""Models, built by name. Every model returns a dict of logits per task (always 'label', the 18
classes; the attention model also 'mask', 'gender', 'age'), and has the same surface: `backbone`,
`num_features`, `forward_features`. Losses live outside the models.

Names: every torchvision classification model (`torchvision.models.list_models(module=
torchvision.models)`: resnet18, mobilenet_v2, efficientnet_b4, convnext_tiny, swin_t, vit_b_16, ...)
as an 18-class classifier; `timm/<name>` for a timm model (the `maskcls[timm]` extra), e.g.
`timm/tf_efficientnet_b4.ns_jft_in1k`; and the registered models (`attention`, whose `backbone`
argument takes any of those names).

>>> model = create_model("resnet18", weights="none")
>>> model(torch.zeros(2, 3, 224, 224))["label"].shape
torch.Size([2, 18])
"""
from __future__ import annotations

from typing import Callable

import torch
import torchvision
from torch import nn

from preprocess import labels as L

from classify.models import weights as W
from classify.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn
    return deco


def torchvision_models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def list_models() -> list[str]:
    """The registered models and every torchvision classification model (timm models: `timm/<name>`)."""
    return sorted(_REGISTRY) + torchvision_models()


def check_backbone(arch: str) -> None:
    """Raise a ConfigError unless `arch` names a backbone that can be built here."""
    if arch.startswith("timm/"):
        timm = _timm(arch)
        if not timm.is_model(arch[5:]):
            raise ConfigError(f"timm has no model {arch[5:]!r} (see timm.list_models('*pattern*', pretrained=True))")
    elif arch not in torchvision_models():
        raise ConfigError(f"unknown backbone {arch!r}: use a torchvision classification model "
                          f"({', '.join(torchvision_models()[:6])}, ...; see torchvision.models.list_models()) "
                          "or timm/<name>")


def check_model(name: str, backbone: str | None = None) -> None:
    if name in _REGISTRY:
        if name == "attention":
            check_backbone(backbone or "resnet18")
        return
    try:
        check_backbone(name)
    except ConfigError as e:
        raise ConfigError(f"unknown model {name!r}: {', '.join(sorted(_REGISTRY))}, a torchvision classification "
                          f"model, or timm/<name> ({e})") from None


def create_model(name: str, weights: str = "none", **kwargs) -> nn.Module:
    """Build a model by name. `weights`: 'none' (random init), 'imagenet' (the backbone's pretrained
    weights, fetched the way its library does: see `weights.pretrained_state`), or a path to a state
    dict of the backbone (keys and shapes must match, classifier layers aside)."""
    check_model(name, kwargs.get("backbone"))
    if name in _REGISTRY:
        model = _REGISTRY[name](**kwargs)
    else:
        model = Classifier(name, **kwargs)
    if weights != "none":
        model.backbone.load_pretrained(W.backbone_state(model.backbone.arch, weights), weights)
    return model


def model_arch(name: str, kwargs: dict) -> str:
    """The backbone architecture a model name and its arguments build."""
    return kwargs.get("backbone", "resnet18") if name in _REGISTRY else name


def _timm(arch: str):
    try:
        import timm
    except ImportError:
        raise ConfigError(f"{arch} needs timm: pip install 'maskcls[timm]'") from None
    return timm


class Backbone(nn.Module):
    """A torchvision or timm classifier without its last layer: images → pooled features (B, num_features).

    The torchvision model's last layer with 1000 outputs (a Linear, or SqueezeNet's 1x1 Conv2d) becomes
    an identity; timm models are built with `num_classes=0`. `head_keys` are the state-dict prefixes
    of what was removed: a pretrained file may carry them, and only them, beyond our own tensors."""

    def __init__(self, arch: str):
        super().__init__()
        check_backbone(arch)
        if arch.startswith("timm/"):
            timm = _timm(arch)
            net = timm.create_model(arch[5:], pretrained=False, num_classes=0)
            self.num_features = net.num_features
            head = net.pretrained_cfg.get("classifier", "head")
            self.head_keys = tuple(head) if isinstance(head, (list, tuple)) else (head,)
        else:
            extra = {"aux_logits": False, "init_weights": False} if arch in ("googlenet", "inception_v3") else {}
            net = torchvision.models.get_model(arch, weights=None, **extra)
            name, layer = [(n, m) for n, m in net.named_modules()
                           if (isinstance(m, nn.Linear) and m.out_features == 1000)
                           or (isinstance(m, nn.Conv2d) and m.out_channels == 1000)][-1]
            self.num_features = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
            parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
            setattr(parent, name.rpartition(".")[2], nn.Identity())
            self.head_keys = (name, "AuxLogits", "aux1", "aux2")
        self.net = net
        self.arch = arch
        self.frozen = False

    def train(self, mode: bool = True):
        # A frozen backbone stays in eval mode: its BatchNorm statistics must not drift either.
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def load_pretrained(self, state: dict, source: str) -> None:
        """Load the backbone's tensors from a state dict in its library's naming. Every tensor of ours
        must be there with its shape; beyond them only the removed classifier's may be. Anything else
        is refused naming the first mismatches (resnet34 weights do not go into a resnet18)."""
        state = {k[4:] if k.startswith("net.") else k: v for k, v in state.items()}
        own = self.net.state_dict()
        missing = [k for k in own if k not in state]
        wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                 if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        extra = [k for k in state if k not in own and not any(k == h or k.startswith(h + ".") for h in self.head_keys)]
        if missing or wrong or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} of {len(own)} tensors missing ({', '.join(missing[:3])})")
            if wrong:
                parts.append(f"{len(wrong)} of another shape ({', '.join(wrong[:2])})")
            if extra:
                parts.append(f"{len(extra)} not in {self.arch} ({', '.join(extra[:3])})")
            raise ConfigError(f"--weights {source} does not fit {self.arch}: {'; '.join(parts)}. "
                              "Is it for another architecture?")
        self.net.load_state_dict({k: state[k] for k in own}, strict=True)


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


def compose_task_logits(mask: torch.Tensor, gender: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
    """(B, 18) log-probabilities of the 18 classes if mask, gender and age were independent given the
    image: log p(m) + log p(g) + log p(a), in the label layout of `labels.combine_tasks`."""
    return L.combine_tasks(mask.log_softmax(-1), gender.log_softmax(-1), age.log_softmax(-1))


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

    tasks = tuple(L.TASKS)

    def __init__(self, backbone: str = "resnet18", hidden: int = 256, heads: int = 4, dropout: float = 0.2,
                 num_classes: int = L.NUM_CLASSES):
        super().__init__()
        self.backbone = Backbone(backbone)
        self.num_features = self.backbone.num_features
        self.branches = nn.ModuleDict({t: nn.Sequential(nn.Dropout(dropout), nn.Linear(self.num_features, hidden),
                                                        nn.LayerNorm(hidden), nn.GELU()) for t in self.tasks})
        self.task_heads = nn.ModuleDict({t: nn.Linear(hidden, len(L.TASKS[t])) for t in self.tasks})
        self.task_embed = nn.Parameter(torch.zeros(len(self.tasks), hidden))
        nn.init.normal_(self.task_embed, std=0.02)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.fused_head = nn.Linear(hidden * len(self.tasks), num_classes)
        self.attn_weights: torch.Tensor | None = None

    def forward_features(self, x):
        return self.backbone(x)

    def forward(self, x):
        f = self.forward_features(x)
        hidden = [self.branches[t](f) for t in self.tasks]
        out = {t: self.task_heads[t](h) for t, h in zip(self.tasks, hidden)}
        tokens = torch.stack(hidden, dim=1) + self.task_embed  # (B, 3, hidden)
        fused, weights = self.attn(tokens, tokens, tokens, need_weights=True)
        if not (torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()):
            self.attn_weights = weights  # kept for a look after a forward; an exported graph has no state
        fused = self.norm(tokens + fused)
        out["label"] = self.fused_head(fused.flatten(1)) + compose_task_logits(out["mask"], out["gender"], out["age"])
        return out


def output_heads(model: nn.Module) -> tuple[str, ...]:
    """The heads a model returns, each of which has a loss: ('label',) or ('label', 'mask', 'gender', 'age')."""
    return ("label",) + tuple(getattr(model, "tasks", ()))


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


def upgrade_state(name: str, state: dict) -> dict:
    """A state dict of an older maskcls checkpoint in today's layout (the attention model once also
    registered its heads as `head.*`, duplicates of `branches`, `task_heads`, `attn`, `norm` and
    `fused_head`)."""
    if name == "attention":
        return {k: v for k, v in state.items() if not k.startswith("head.")}
    return state
