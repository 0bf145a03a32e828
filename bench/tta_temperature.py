"""Where the temperature goes when TTA averages views (issue 28, item 7): per view before the mean, or on
the log of the views' mean probability. Two synthetic workloads whose classes are visible (40 people, half of
them validation), resnet18 5 epochs at 32 px, TTA 4 views; ECE, NLL and accuracy of both forms.

    python bench/tta_temperature.py        # writes its runs under /tmp/item7
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np, torch
from pathlib import Path
from classify.training.config import TrainConfig
from classify.training.train import fit
from classify.checkpoint import load_checkpoint
from classify.inference.card import card_of
from classify.inference.torch_backend import model_logits
from classify.inference.calibration import apply_temperature, ece  # noqa: E402
from classify.inference.answer import model_probs
from classify.inference import rundir
from classify.data.dataset import load_rows, person_key
from tests.conftest import make_crops
for seed in (0, 1):
    base = Path(f"/tmp/item7/{seed}")
    crops = make_crops(base / "c", people=40, seed=seed)
    fit(TrainConfig(crops=str(crops), out=str(base / "r"), model="resnet18", epochs=5, img_size=32, batch_size=32, lr=1e-3,
                    workers=0, weights="none", device="cpu", preset="base", val_ratio=0.5, seed=seed), warn=lambda m: None)
    ck = load_checkpoint(base / "r" / "best.pt"); T = card_of(ck).temperature
    split = rundir.read_split(base / "r")
    rows = [r for r in load_rows(crops)[1] if split.get(person_key(r)) == "val"]
    y = np.array([r["label"] for r in rows])
    z = model_logits([ck], crops, rows, torch.device("cpu"), tta=4, workers=0)[0]  # 4 x N x 18
    per_view = apply_temperature(z, T).mean(0)                       # T per view, then the mean
    mean_p = model_probs(z, 1.0)
    after = apply_temperature(np.log(np.clip(mean_p, 1e-12, 1)), T)  # before: the mean, then T on log p
    lnl = lambda p: float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1)).mean())
    print(f"seed {seed}: T {T:.3g} ({card_of(ck).calibration.get('kept','applied')}); photos {len(y)}; tta 4: "
          f"ECE raw {ece(mean_p, y):.4f}, T per view {ece(per_view, y):.4f}, T after mean {ece(after, y):.4f}; "
          f"NLL raw {lnl(mean_p):.4f}, per view {lnl(per_view):.4f}, after mean {lnl(after):.4f}; "
          f"acc per view {(per_view.argmax(1)==y).mean():.3f} after {(after.argmax(1)==y).mean():.3f}")
