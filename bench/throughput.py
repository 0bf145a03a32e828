"""Training-step and prediction throughput on this machine (no target yet: a baseline for later work).

    python bench/throughput.py [--steps 5] [--batch 32] [--img-size 224] [--workdir DIR]

Training: images/s of full steps (forward, loss, backward, AdamW) on random uint8 batches, per model,
at the default image size, on the device chosen by --device. Prediction: photos/s of
`maskcls predict` from raw eval photos, the crop stage included (a fresh crops folder), whole process.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from workload import make_workload, workdir  # noqa: E402


def train_rate(name: str, steps: int, batch: int, size: int, device: torch.device, amp: bool) -> float:
    from classify.inference.engine import autocast
    from classify.training.losses import MultiTaskLoss, make_loss
    from classify.models.nets import create_model, model_kwargs
    from classify.data.transforms import normalize

    torch.manual_seed(0)
    model = create_model(name, **model_kwargs(name)).to(device).train()
    amp = "bf16" if amp else "off"
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    heads = ("label", "mask", "gender", "age") if name == "attention" else ("label",)
    crit = MultiTaskLoss(make_loss("ce"), heads, "uncertainty" if name == "attention" else "fixed").to(device)
    opt = torch.optim.AdamW(list(model.parameters()) + list(crit.parameters()), lr=1e-3)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)  # a loader batch
    y = torch.randint(0, 18, (batch,))

    def step():
        xb = normalize(x.to(device), channels_last=device.type == "cuda")
        with autocast(device, amp):
            out = model(xb)
        loss, _ = crit(out, y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast + channels_last (CUDA)")
    ap.add_argument("--eval-photos", type=int, default=98)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"training step, batch {args.batch} x {args.img_size}px, {args.steps} steps, device {device}, "
          f"torch threads {torch.get_num_threads()}, amp {args.amp}")
    for name in ("resnet18", "efficientnet_b0", "attention"):
        print(f"  {name:16s} {train_rate(name, args.steps, args.batch, args.img_size, device, args.amp):8.1f} images/s")

    work = workdir(args.workdir)
    raw = work / "raw-eval"
    truth = make_workload(raw / "src", args.eval_photos, seed=2)
    (raw / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for k, src in enumerate(sorted(truth)):
        name = f"{k:05d}.jpg"
        shutil.copy(raw / "src" / src, raw / "images" / name)
        names.append(name)
    (raw / "info.csv").write_text("ImageID,ans\n" + "".join(f"{n},0\n" for n in names))
    crops = work / "train-crops"
    run = work / "run"
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "crop", str(raw / "src"), "--out", str(crops)],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "train", str(crops), "--out", str(run), "--epochs", "1",
                    "--weights", "none", "--workers", "0"], check=True, capture_output=True)
    shutil.rmtree(work / "pred-crops", ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "predict", str(run / "best.pt"), str(raw), "--out",
                    str(work / "sub.csv"), "--crops", str(work / "pred-crops"), "--device", args.device],
                   check=True, capture_output=True)
    secs = time.perf_counter() - t
    print(f"predict resnet18 from raw eval photos (crop included, whole process): {len(names)} photos in "
          f"{secs:.1f} s = {len(names) / secs:.1f} photos/s")


if __name__ == "__main__":
    main()
