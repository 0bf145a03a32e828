"""Pretrained backbone weights, got the way their library gets them, and weights files checked before use.

- torchvision: the architecture's ImageNet weights (torchvision's weights API): the DEFAULT set, or
  another of its sets already in the torch hub cache (`$TORCH_HOME/hub/checkpoints/`, e.g. mobilenet_v2's
  IMAGENET1K_V1 file), else the DEFAULT downloaded by torch hub with a progress bar into that cache,
  the file's hash checked. `MASKCLS_TORCHVISION_MIRROR` (a base URL)
  replaces `https://download.pytorch.org/models/` for a mirror.
- timm (`timm/<name>`): timm's own pretrained loading (the Hugging Face hub cache).
- a file: a state dict (`.pth`/`.pt`, `.safetensors`, or a maskcls checkpoint, whose backbone is
  taken), loaded with `weights_only=True`: a file that carries code is refused, never unpickled.

The input normalisation (mean, std, interpolation) of a backbone comes from its weights' own config
(torchvision's `weights.transforms()`, timm's `resolve_data_config`), so training, validation and
predict standardise images as the pretrained network expects.
"""
from __future__ import annotations

import os
import re
import socket
import sys
import urllib.parse
from pathlib import Path

import torch
import torchvision

from classify.checkpoint import read_torch_file
from classify.errors import ConfigError

TORCHVISION_BASE = "https://download.pytorch.org/models/"
IMAGENET_CONFIG = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}


class WeightsUnavailable(ConfigError):
    """The pretrained weights are neither cached nor downloadable (offline)."""


# -- normalisation -----------------------------------------------------------------------------------

def is_named(weights: str) -> bool:
    """'imagenet', or the name of one of torchvision's weights sets (IMAGENET1K_V1, DEFAULT, ...)."""
    return weights == "imagenet" or re.fullmatch(r"[A-Z][A-Z0-9_]*", weights) is not None


def data_config(arch: str, net: torch.nn.Module | None = None, which: str = "imagenet") -> dict:
    """{'mean', 'std', 'interpolation'} the pretrained weights of `arch` expect (`net`: the built timm
    model; `which`: the torchvision weights set, see `download`)."""
    if arch.startswith("timm/"):
        import timm

        if net is None:
            net = timm.create_model(arch[5:], pretrained=False, num_classes=0)
        cfg = timm.data.resolve_data_config({}, model=net)
        return {"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
                "interpolation": "bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear"}
    t = _torchvision_choice(arch, which if is_named(which) else "imagenet").transforms()
    interp = getattr(t, "interpolation", None)
    return {"mean": [float(v) for v in t.mean], "std": [float(v) for v in t.std],
            "interpolation": "bicubic" if interp is not None and interp.value == "bicubic" else "bilinear"}


# -- where the pretrained weights live ---------------------------------------------------------------

def _mirrored(url: str) -> str:
    mirror = os.environ.get("MASKCLS_TORCHVISION_MIRROR")
    return mirror.rstrip("/") + "/" + os.path.basename(url) if mirror else url


def _torchvision_choice(arch: str, which: str = "imagenet"):
    """The weights set `which` names for `arch`: 'imagenet' is the DEFAULT, unless only another of its
    sets is cached; else a set by name (IMAGENET1K_V1, ...), as torchvision's get_model(weights=...)."""
    enum = torchvision.models.get_model_weights(arch)
    if which != "imagenet":
        try:
            return enum[which]
        except KeyError:
            raise ConfigError(f"--weights {which}: {arch} has the weights sets "
                              f"{', '.join(w.name for w in enum)} (or DEFAULT), or use imagenet") from None
    for w in [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]:
        if hub_file(w.url).is_file():
            return w
    return enum.DEFAULT


def weights_file(arch: str, which: str = "imagenet") -> str | None:
    """The name of the file `which` means for `arch` now (torchvision), for the run's records."""
    return None if arch.startswith("timm/") else os.path.basename(_torchvision_choice(arch, which).url)


def hub_file(url: str) -> Path:
    """Where torch hub caches the file of `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)


def _timm_source(arch: str) -> tuple[str | None, str | None]:
    """(Hugging Face repo id, url) of a timm model's default pretrained weights."""
    import timm

    cfg = timm.create_model(arch[5:], pretrained=False, num_classes=0).pretrained_cfg
    return cfg.get("hf_hub_id"), cfg.get("url")


def _timm_cached(repo: str | None, url: str | None) -> str | None:
    if repo:
        from huggingface_hub import try_to_load_from_cache

        for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                return hit
        return None
    if url and hub_file(url).is_file():
        return str(hub_file(url))
    return None


def cached(arch: str, which: str = "imagenet") -> bool:
    """Are the pretrained weights of `arch` on this machine already?"""
    if arch.startswith("timm/"):
        return _timm_cached(*_timm_source(arch)) is not None
    return hub_file(_torchvision_choice(arch, which).url).is_file()


def _reachable(url: str, timeout: float = 5.0) -> str | None:
    """None when a TCP connection to the url's host opens, else the reason. A quick look first, so an
    offline machine is told at once (timm's hub client retries for most of a minute)."""
    u = urllib.parse.urlparse(url)
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout).close()
        return None
    except OSError as e:
        return str(e) or type(e).__name__


def _offline(arch: str, what: str, source: str, reason: str, place: str) -> WeightsUnavailable:
    return WeightsUnavailable(f"cannot download the ImageNet weights of {arch} ({what} from {source}): {reason}. "
                              f"Offline? {place}, or pass --weights PATH (a state dict), or --weights none.")


def download(arch: str, which: str = "imagenet", progress: bool = True) -> dict:
    """The pretrained state dict of `arch`, from the cache or downloaded (with a progress bar) into it.
    `which`: 'imagenet' or a torchvision weights set's name (timm models: their default pretrained tag,
    chosen in the name: timm/<model>.<tag>)."""
    if arch.startswith("timm/"):
        import timm

        repo, url = _timm_source(arch)
        if _timm_cached(repo, url) is None:
            where = f"https://huggingface.co/{repo}" if repo else url
            reason = _reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co") if repo else url)
            if reason:
                raise _offline(arch, "model.safetensors" if repo else os.path.basename(url), where, reason,
                               "Download that file on a machine that is online")
        try:
            return timm.create_model(arch[5:], pretrained=True, num_classes=0).state_dict()
        except OSError as e:
            raise _offline(arch, "its pretrained file", repo or url, str(e).splitlines()[0],
                           "Download it on a machine that is online") from None
    return load_state_file(fetch_file(arch, which, progress))


def fetch_file(arch: str, which: str = "imagenet", progress: bool = True) -> Path:
    """The torchvision weights file of `arch` in the hub cache, downloaded first if it is not there."""
    url = _mirrored(_torchvision_choice(arch, which).url)
    path = hub_file(url)
    if not path.is_file():
        place = f"Put {path.name} (from {url}) at {path}"
        reason = _reachable(url)
        if reason:
            raise _offline(arch, path.name, url, reason, place)
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.stderr.write(f'Downloading: "{url}" to {path}\n')
        try:
            torch.hub.download_url_to_file(url, str(path), hash_prefix=_hash_prefix(path.name), progress=progress)
        except RuntimeError as e:  # the hash check: the partial file is deleted by torch
            raise ConfigError(f"the download of {path.name} from {url} is not the published file ({e}); "
                              "nothing was kept. Try again, or check the mirror.") from None
        except OSError as e:
            raise _offline(arch, path.name, url, str(e), place) from None
    return path


def _hash_prefix(filename: str) -> str | None:
    """torchvision's file names end in the first hex digits of their sha256 (resnet18-f37072fd.pth)."""
    stem = filename.rsplit(".", 1)[0]
    tail = stem.rsplit("-", 1)[-1]
    return tail if len(tail) >= 8 and all(c in "0123456789abcdef" for c in tail) else None


def resolve(weights: str, arch: str) -> tuple[str, str | None]:
    """('imagenet' | 'none' | PATH, a warning or None). 'auto' is imagenet when the weights are cached or
    can be downloaded, else random init with a warning that says what to do."""
    if weights != "auto":
        if is_named(weights) and arch.startswith("timm/") and weights != "imagenet":
            raise ConfigError(f"--weights {weights}: name a timm model's weights by its tag (timm/<model>.<tag>) "
                              "and use --weights imagenet")
        if is_named(weights) and not arch.startswith("timm/"):
            _torchvision_choice(arch, weights)  # an unknown set name is an error now, before any work
        return weights, None
    if cached(arch):
        return "imagenet", None
    try:
        download(arch) if arch.startswith("timm/") else fetch_file(arch)  # loaded once, by create_model
    except WeightsUnavailable as e:
        return "none", f"training {arch} from random init: {e}"
    return "imagenet", None


def backbone_state(arch: str, weights: str) -> dict:
    """The state dict `weights` ('imagenet', a torchvision weights set's name, or a file path) names for
    the backbone `arch`."""
    if is_named(weights) and not Path(weights).is_file():
        return download(arch, weights)
    return load_state_file(Path(weights), what=f"--weights {weights}")


# -- reading a weights file ----------------------------------------------------------------------------

def load_state_file(path: Path, what: str | None = None) -> dict:
    """A state dict of tensors from a file, or a ConfigError that says what the file is instead."""
    path = Path(path)
    what = what or str(path)
    if not path.is_file():
        raise ConfigError(f"{what}: no such file (use imagenet, none, auto, or a path to a state dict)")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"{what} is a safetensors file: pip install 'maskcls[timm]' (it brings safetensors)") from None
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors' own errors
            raise ConfigError(f"{what}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    obj = read_torch_file(path, what, error=ConfigError)
    return _state_of(obj, what)


def _state_of(obj, what: str) -> dict:
    if isinstance(obj, dict) and obj.get("format") == "maskcls-checkpoint":  # a maskcls run: its backbone
        obj = {k[len("backbone."):]: v for k, v in obj.get("model_state", {}).items() if k.startswith("backbone.")}
    elif isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{what} is a PyTorch file but not a state dict of tensors "
                          f"(it holds a {type(obj).__name__})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
