"""Where a model looks: Grad-CAM per task, with the `grad-cam` package (pytorch-grad-cam; the
`maskcls[explain]` extra), for any torchvision or timm backbone and the attention model.

- The layer hooked is found by running the backbone once: the last module whose output is a spatial
  map (N x C x H x W with H, W >= 2: a CNN's last stage, before global pooling, whose map would be
  constant), or for a transformer the last token sequence (N x L x C with a square grid of L or L - 1
  tokens), reshaped into a map.
- Each task gets its own map: the attention model's mask, gender and age heads; for a single-head model
  the task's logits are derived from the 18-class logits (logsumexp over the classes of each value),
  so its three maps differ too. The target is the task's predicted value.
- `mask_region_shares`: of a map's mass, the share in the lower half of the face box (where a mask is)
  and in the face box at all. The crop stage cut the crop as a square of (1 + 2 margin) x the face
  box's side around it, so the face box is the crop's central 1 / (1 + 2 margin).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from preprocess import labels as L
from preprocess.imageio import read_crop

from classify.errors import ConfigError
from classify.data.transforms import build_transform, normalize
from classify.inference.rundir import write_csv

TASKS = ("mask", "gender", "age")


def _gradcam():
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise ConfigError("Grad-CAM needs the grad-cam package: pip install 'maskcls[explain]'") from None
    return GradCAM, ClassifierOutputTarget


def cam_layer(model: nn.Module, img_size: int) -> tuple[nn.Module, object, str]:
    """(module to hook, reshape_transform or None, its name) of the model's backbone."""
    seen: list[tuple[str, nn.Module, tuple]] = []
    def record(name, mod, out):
        if isinstance(out, torch.Tensor):  # attention layers return tuples: not a map
            seen.append((name, mod, tuple(out.shape)))

    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: record(name, mod, out))
             for name, m in model.backbone.net.named_modules() if name]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, img_size, img_size))
    finally:
        for h in hooks:
            h.remove()
    # A transformer: the last block's first norm (its tokens still mix into the class token through the
    # block's attention; the encoder's output reaches the head through the class token alone, so its
    # patch tokens get no gradient), as pytorch-grad-cam recommends for ViTs.
    tokens = [(n, m, s) for n, m, s in seen if len(s) == 3 and n.rsplit(".", 1)[-1] in ("ln_1", "norm1")]
    for name, module, shape in reversed(seen):  # forward hooks fire as modules finish: outer blocks last
        if len(shape) == 4 and shape[2] >= 2 and shape[3] >= 2:
            return module, None, name
        if len(shape) == 3:
            name, module, shape = tokens[-1] if tokens else (name, module, shape)
            for skip in (1, 0):  # a class token first, or none
                side = math.isqrt(shape[1] - skip)
                if side >= 2 and side * side == shape[1] - skip:
                    return module, _tokens_to_map(side, skip), name
    raise ConfigError(f"{model.backbone.arch}: no layer with a spatial map or a square token grid to explain")


def _tokens_to_map(side: int, skip: int):
    def reshape(t: torch.Tensor) -> torch.Tensor:
        t = t[:, skip:, :] if t.shape[1] == side * side + skip else t
        return t.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)
    return reshape


class TaskOutput(nn.Module):
    """The model as a one-task classifier: its `task` head, or the task's logits derived from the
    18-class logits (logsumexp over the classes that have each value of the task)."""

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model, self.task = model, task
        parts = dict(zip(TASKS, L.task_parts(np.arange(L.NUM_CLASSES))))[task]
        self.register_buffer("members", torch.tensor([[int(p == v) for p in parts] for v in range(len(L.TASKS[task]))],
                                                     dtype=torch.bool))

    def forward(self, x):
        out = self.model(x)
        if self.task in out:
            return out[self.task]
        logits = out["label"]
        return torch.stack([logits.masked_fill(~m, float("-inf")).logsumexp(-1) for m in self.members], dim=1)


def task_maps(model: nn.Module, x: torch.Tensor, img_size: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({task: N x H x W maps in [0, 1]}, {task: N predicted values}) for a normalised batch `x`. The
    predicted values are the parts of predict's class (the 18-class argmax, which the temperature keeps),
    never a task head's or marginal's own argmax, so explain names what predict answers."""
    GradCAM, Target = _gradcam()
    layer, reshape, _ = cam_layer(model, img_size)
    model.eval()
    with torch.no_grad():
        label = model(x)["label"].argmax(-1).numpy()
    preds = dict(zip(TASKS, (np.asarray(p) for p in L.task_parts(label))))
    maps = {}
    for task in TASKS:
        head = TaskOutput(model, task).eval()
        with GradCAM(model=head, target_layers=[layer], reshape_transform=reshape) as cam:
            maps[task] = cam(input_tensor=x, targets=[Target(int(v)) for v in preds[task]])
    return maps, preds


def mask_region_shares(cam: np.ndarray, margin: float) -> tuple[float, float]:
    """(share of the map's mass in the lower half of the face box, share in the face box)."""
    h, w = cam.shape
    f = 1 / (1 + 2 * margin)
    y0, y1 = round(h * (1 - f) / 2), round(h * (1 + f) / 2)
    x0, x1 = round(w * (1 - f) / 2), round(w * (1 + f) / 2)
    total = float(cam.sum())
    if total <= 0:
        return 0.0, 0.0
    return float(cam[(y0 + y1) // 2:y1, x0:x1].sum()) / total, float(cam[y0:y1, x0:x1].sum()) / total


FLAT = 1e-6  # a map whose peak is below this is all zero: Grad-CAM found no evidence for the predicted value


def explain_crops(ckpt: dict, crops: Path, rows: list[dict], out: Path, title: str, truth: bool = True) -> tuple[Path, Path]:
    """gradcam.png (each photo's crop and its three task maps, titled with true and predicted labels)
    and gradcam.csv (per photo and task: predicted value, the map's share below the nose and in the
    face, whether the map is `flat`, and whether the model has `learned` the task at all: its card's
    validation) for `rows` of `crops`, with the checkpoint's eval transform. A task the model has not
    learned is titled so in the figure: its map shows where a guess looks. A flat map (all zero: the
    hooked layer holds no positive evidence for the predicted value, as for a model that has not learned
    the task) says nothing about where the model looks: the CSV marks it, the figure says so instead of
    drawing it, and `flat_maps` counts them."""
    from classify.inference.torch_backend import load_model
    from classify.inference.card import card_of

    spec = card_of(ckpt)
    model = load_model(ckpt, torch.device("cpu"))
    for p in model.parameters():
        p.requires_grad_(True)
    tf = build_transform(spec.preset, spec.img_size, train=False, interpolation=spec.interpolation)
    imgs = [tf(image=read_crop(crops / r["crop"]))["image"] for r in rows]
    x = normalize(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(), list(spec.mean), list(spec.std))
    maps, preds = task_maps(model, x, spec.img_size)
    margin = float((spec.crop.get("config") or {}).get("margin", 0.3))
    names = {t: (L.MASK_NAMES, L.GENDER_NAMES, L.age_names(spec.old))[i] for i, t in enumerate(TASKS)}
    table = []
    for k, r in enumerate(rows):
        true = dict(zip(TASKS, (r["mask"], r["gender"], r["age_group"]))) if truth and r.get("label", -1) >= 0 else {}
        for t in TASKS:
            flat = is_flat(maps[t][k])
            lower, face = mask_region_shares(maps[t][k], margin)
            table.append([r["image_id"], t, names[t][true[t]] if t in true else "", names[t][preds[t][k]],
                          "" if flat else f"{lower:.4f}", "" if flat else f"{face:.4f}", int(flat),
                          int(t not in spec.unlearned)])
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "gradcam.csv", ["image_id", "task", "true", "predicted", "lower_face_share", "face_share", "flat",
                                    "learned"], table)
    if spec.unlearned:
        title += f"\nthe model has not learned {', '.join(spec.unlearned)}: those answers and maps show a guess"
    _figure(out / "gradcam.png", imgs, rows, maps, preds, names, title, truth, spec.unlearned)
    return out / "gradcam.png", out / "gradcam.csv"


def is_flat(cam: np.ndarray) -> bool:
    return not float(np.max(cam, initial=0.0)) > FLAT or not np.isfinite(cam).all()


def flat_maps(table_csv: Path) -> tuple[int, int]:
    """(flat maps, maps) of a gradcam.csv."""
    with open(table_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return sum(r["flat"] == "1" for r in rows), len(rows)


def explain_photos(model: Path, photos: list[Path], out: Path, cache: Path | None = None,
                   device: str = "cpu") -> tuple[Path, Path, list[str]]:
    """Grad-CAM per task for any photos, cropped as predict crops them: (gradcam.png, gradcam.csv,
    warnings). `model`: a checkpoint or run folder. `cache`: a crops cache root; the photos are cropped
    once per set of photos there (else in a temporary folder).

    >>> explain_photos(Path("run"), [Path("a.jpg"), Path("b.jpg")], Path("explained"))
    """
    import shutil
    import tempfile

    from classify.checkpoint import load_checkpoint
    from classify.inference.card import card_of
    from classify.inference.cropping import crops_for
    from classify.inference.onnx_model import is_onnx
    from classify.inference.torch_backend import checkpoint_paths
    from preprocess.imageio import content_digest
    from preprocess.manifest import read_manifest

    if is_onnx(model):
        raise ConfigError(f"{model}: explain needs a checkpoint (Grad-CAM follows the torch model's gradients); "
                          "give the run folder or best.pt it was exported from")
    ckpt = load_checkpoint(checkpoint_paths([model])[0])
    card = card_of(ckpt)
    for p in photos:
        if not Path(p).is_file():
            raise ConfigError(f"{p}: no such photo")
    names = [f"{k:04d}_{Path(p).name}" for k, p in enumerate(photos)]
    with tempfile.TemporaryDirectory(prefix="maskcls-explain-") as tmp:
        # The photos as an eval folder. With a cache root it lives there, one per set of photos, so a second
        # call finds its crops (a crops folder holds the crops of one raw folder, at one path).
        key = content_digest(b"".join(n.encode() + Path(p).read_bytes() for n, p in zip(names, photos)))[:16]
        base = Path(cache) / key if cache else Path(tmp)
        raw = base / "raw"
        (raw / "images").mkdir(parents=True, exist_ok=True)
        for p, n in zip(photos, names):
            shutil.copyfile(p, raw / "images" / n)
        (raw / "info.csv").write_text("ImageID,ans\n" + "".join(f"{n},0\n" for n in names))
        folder, warnings = crops_for(raw, card.crop, base / "crops", device)
        rows = read_manifest(folder)
        for r, p in zip(rows, photos):
            r["image_id"] = str(p)  # the path as given: two photos named normal.jpg stay apart
        png, table = explain_crops(ckpt, folder, rows, Path(out), f"Grad-CAM per task ({len(rows)} photos)", truth=False)
    if card.caution:  # as predict says it: where a model has not learned, its maps show a guess
        warnings.insert(0, card.caution)
    flat, total = flat_maps(table)
    if flat:
        warnings.append(f"{flat} of {total} Grad-CAM maps are flat (all zero): the model holds no evidence for its "
                        "answer there (a model that has not learned the task, or an answer it barely prefers); "
                        "those maps say nothing about where it looks (the 'flat' column of gradcam.csv)")
    return png, table, warnings


def _figure(path: Path, imgs, rows, maps, preds, names, title: str, truth: bool, unlearned=()) -> None:
    from classify.plots import pyplot, save_figure

    plt = pyplot()
    n = len(rows)
    height = n * 2.3 + 0.9
    fig, axes = plt.subplots(n, 4, figsize=(10, height), dpi=100, squeeze=False)
    for k, r in enumerate(rows):
        axes[k, 0].imshow(imgs[k])
        axes[k, 0].set_title(r["image_id"][-30:], fontsize=7)
        true = dict(zip(TASKS, (r["mask"], r["gender"], r["age_group"]))) if truth and r.get("label", -1) >= 0 else {}
        for j, t in enumerate(TASKS, start=1):
            axes[k, j].imshow(imgs[k])
            said = f"true {names[t][true[t]]}, " if t in true else ""
            if is_flat(maps[t][k]):  # nothing to draw: say so rather than show a blank overlay as a map
                axes[k, j].imshow(imgs[k] // 3)
                axes[k, j].text(0.5, 0.5, "flat map:\nno evidence\nfor this answer", color="white", ha="center",
                                va="center", fontsize=8, transform=axes[k, j].transAxes)
            else:
                axes[k, j].imshow(maps[t][k], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            guess = " (not learned: a guess)" if t in unlearned else ""
            axes[k, j].set_title(f"{t}: {said}predicted {names[t][preds[t][k]]}{guess}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(top=1 - (1.0 if unlearned else 0.75) / height, bottom=0.01, left=0.01, right=0.99, hspace=0.35,
                        wspace=0.05)
    save_figure(fig, path)
