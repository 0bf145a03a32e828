"""`maskcls crop`: raw photos → face crops and CROPS/manifest.csv (one rank or several under torchrun)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import LazyProgress, check_outputs, console, user_errors, warning


@user_errors
def crop(
    raw: Path = typer.Argument(..., metavar="RAW", help="Raw data set: competition train/eval folder, or a folder with labels.csv."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for crops/, manifest.csv, crops.npy."),
    size: int = typer.Option(256, help="Side of the square crop, pixels."),
    margin: float = typer.Option(0.3, help="Fraction of the face box side added on each side."),
    device: str = typer.Option("auto", help="auto | cpu | cuda (auto: cuda when available)."),
    batch_size: int = typer.Option(32, help="Photos per detector call; equal-size photos are batched."),
    detect_side: int = typer.Option(256, help="Detect on a copy with this longer side (0: full size)."),
    min_face: float = typer.Option(0.3, help="Smallest face searched, fraction of the photo's shorter side."),
    workers: int = typer.Option(2, help="Threads that decode photos and write crops."),
    old: int = typer.Option(60, help="Age-group threshold for the manifest's age_group/label (>= old is group 2)."),
    pack: bool = typer.Option(True, metavar="", help="Also write crops.npy, the uint8 array training memory-maps."),
    strict: bool = typer.Option(False, "--strict", metavar="", help="Stop before any work if a photo is missing or badly named."),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="", help="Replace the crops in --out even if they were made from another RAW."),
    prior: Optional[Path] = typer.Option(None, help="Training crops folder, checkpoint, run folder or .onnx whose face "
                                                    "prior chooses the face of lone photos (eval): crop eval photos as "
                                                    "training's.", show_default=False),
):
    """Find the face in every photo and write square crops plus CROPS/manifest.csv."""
    check_outputs(folders={"--out": out})
    from preprocess import CropConfig, crop_dataset
    from classify.inference.cropping import prior_of
    from preprocess.manifest import PROBLEMS
    from preprocess.runtime import dist_env

    cfg = CropConfig(size=size, margin=margin, device=device, batch_size=batch_size, detect_side=detect_side,
                     min_face=min_face, workers=workers, old=old, pack=pack, strict=strict)
    rank, world, _ = dist_env()
    dist = None
    if world > 1:  # under torchrun: each rank crops its share of the people on its own device
        import dataclasses

        from classify.training.distributed import init_distributed
        dist = init_distributed(cfg.device)
        cfg = dataclasses.replace(cfg, device=str(dist.device))
    t0 = time.perf_counter()
    try:
        with LazyProgress("crop") as bar:
            res = crop_dataset(raw, out, cfg, on_progress=bar.update if rank == 0 else None, rank=rank,
                               world=world, barrier=dist.barrier if dist else None,
                               broadcast=dist.broadcast if dist else None, prior=prior_of(prior) if prior else None,
                               overwrite=overwrite)
    except BaseException:
        if dist:
            dist.abort()
            dist = None
        raise
    finally:
        if dist:
            dist.close()
    if rank != 0:
        return
    secs = time.perf_counter() - t0
    console.print(f"{len(res.rows)} photos, {res.layout} layout, {secs:.1f}s", highlight=False)
    table = Table()
    table.add_column("status")
    table.add_column("photos", justify="right")
    for status, n in res.counts.items():
        if n:
            table.add_row(status, str(n))
    table.add_row("[dim]detected this run[/]", str(res.detected))
    table.add_row("[dim]reused from cache[/]", str(len(res.rows) - res.detected))
    console.print(table)
    for w in res.warnings:
        warning(w)
    problems = [r for r in res.rows if r["status"] in PROBLEMS]
    for r in problems[:20]:
        console.print(f"[yellow]{r['status']}:[/] {escape(r['source'])}: {escape(r['reason'])}", highlight=False)
    if len(problems) > 20:
        console.print(f"[yellow]… and {len(problems) - 20} more:[/] see the status and reason columns of the manifest")
    console.print(f"manifest: {escape(str(res.crops / 'manifest.csv'))}", highlight=False)

