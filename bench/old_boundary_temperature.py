"""Which labels the temperature is fitted against when training and validation use different age
boundaries (`--old` != `--val-old`; issue 28, item 7). The model's 18 classes mean the training boundary
(--old); the validation labels, the submission's score and the probabilities a user reads mean --val-old.
Fit T on the validation logits against the --val-old labels (what train does) or against the --old
labels, and score each on held-out people at both boundaries (ECE, NLL). Synthetic crops whose classes
are visible (tests/conftest.py make_crops, ages 22/45/57/70: the 57-year-olds are < 60 but >= 55),
resnet18, 5 epochs at 32 px, --old 55, --val-old 60, half the people validating; two seeds.

    python bench/old_boundary_temperature.py        # writes its runs under /tmp/old_boundary
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from classify.checkpoint import load_checkpoint  # noqa: E402
from classify.data.dataset import load_rows, person_key  # noqa: E402
from classify.inference import rundir  # noqa: E402
from classify.inference.calibration import apply_temperature, ece, fit_temperature, nll  # noqa: E402
from classify.inference.card import card_of  # noqa: E402
from classify.inference.torch_backend import model_logits  # noqa: E402
from classify.training.config import TrainConfig  # noqa: E402
from classify.training.train import fit  # noqa: E402
from tests.conftest import make_crops  # noqa: E402

OLD, VAL_OLD, AGES = 55, 60, (22, 45, 57, 70)
for seed in (0, 1):
    base = Path(f"/tmp/old_boundary/{seed}")
    crops = make_crops(base / "c", people=48, seed=seed, ages=AGES)
    held = make_crops(base / "h", people=48, seed=seed + 10, ages=AGES)
    fit(TrainConfig(crops=str(crops), out=str(base / "r"), model="resnet18", epochs=5, img_size=32, batch_size=32,
                    workers=0, weights="none", device="cpu", val_ratio=0.5, seed=seed, old=OLD, val_old=VAL_OLD),
        warn=lambda m: None, overwrite=True)
    ck = load_checkpoint(base / "r" / "best.pt")
    t_val = card_of(ck).temperature  # what train stored: fitted against the --val-old labels (or kept at 1)
    cal = card_of(ck).calibration
    ids, z_val, y_val = rundir.read_val_logits(base / "r")
    by_id = {r["image_id"]: r for r in load_rows(crops, OLD)[0]}
    y_val_old = np.array([by_id[i]["label"] for i in ids])  # the same photos' labels at --old
    t_fit_val, t_fit_old = fit_temperature(z_val, y_val), fit_temperature(z_val, y_val_old)
    rows60 = load_rows(held, VAL_OLD)[1]
    rows55 = {r["image_id"]: r["label"] for r in load_rows(held, OLD)[1]}
    z = model_logits([ck], held, rows60, torch.device("cpu"), tta=1, workers=0)[0][0]
    y60 = np.array([r["label"] for r in rows60])
    y55 = np.array([rows55[r["image_id"]] for r in rows60])
    print(f"seed {seed}: stored T {t_val:.3g} ({cal.get('kept', 'applied')}); fit vs --val-old labels {t_fit_val:.3g}, "
          f"vs --old labels {t_fit_old:.3g}; held-out {len(y60)} photos")
    for name, t in (("T = 1", 1.0), (f"T fitted at --val-old {VAL_OLD}", t_fit_val), (f"T fitted at --old {OLD}", t_fit_old)):
        p = apply_temperature(z, t)
        print(f"  {name:28s} held-out at {VAL_OLD}: ECE {ece(p, y60):.4f} NLL {nll(z, y60, t):.4f} | "
              f"at {OLD}: ECE {ece(p, y55):.4f} NLL {nll(z, y55, t):.4f}")
