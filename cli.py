"""maskcls command line: crop → train → predict (and evaluate, report).

Each command turns its options into the library's config and calls one entry function; the
project's own errors become a one-line message and exit code 1.
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

if __package__ in (None, "") and str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python cli.py` from a checkout

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Face crops, training and prediction for mask status x gender x age group.")
console = Console(stderr=True)


@app.callback()
def main():
    """maskcls: raw photos → face crops → trained classifier → submission."""


def user_errors(fn):
    """Turn the project's own errors (a user's mistake, not a bug) into one line and exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from classify.errors import USER_ERRORS
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    return wrapper


def progress_bar(what: str) -> Progress:
    return Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console, transient=False)


@app.command()
@user_errors
def crop(
    raw: Path = typer.Argument(..., help="Raw data set: competition train/eval folder, or a folder with labels.csv."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for crops/, manifest.csv, crops.npy."),
    size: int = typer.Option(256, help="Side of the square crop, pixels."),
    margin: float = typer.Option(0.3, help="Fraction of the face box side added on each side."),
    device: str = typer.Option("auto", help="auto | cpu | cuda (auto: cuda when available)."),
    batch_size: int = typer.Option(32, help="Photos per detector call; equal-size photos are batched."),
    detect_side: int = typer.Option(320, help="Detect on a copy with this longer side (0: full size)."),
    min_face: float = typer.Option(0.2, help="Smallest face searched, fraction of the photo's shorter side."),
    workers: int = typer.Option(2, help="Threads that decode photos and write crops."),
    old: int = typer.Option(60, help="Age-group threshold for the manifest's age_group/label (>= old is group 2)."),
    pack: bool = typer.Option(True, help="Also write crops.npy, the uint8 array training memory-maps."),
    strict: bool = typer.Option(False, help="Stop before any work if a photo is missing or badly named."),
):
    """Find the face in every photo and write square crops plus CROPS/manifest.csv."""
    from preprocess import CropConfig, crop_dataset
    from preprocess.runtime import dist_env

    cfg = CropConfig(size=size, margin=margin, device=device, batch_size=batch_size, detect_side=detect_side,
                     min_face=min_face, workers=workers, old=old, pack=pack, strict=strict)
    rank, world, _ = dist_env()
    dist = None
    if world > 1:
        from classify.distributed import init_distributed
        dist = init_distributed(cfg.device)
    t0 = time.perf_counter()
    with progress_bar("crop") as bar:
        task = bar.add_task("crop", total=None, rate="")

        def tick(done, total):
            rate = done / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, completed=done, total=total, rate=f"{rate:.1f} photos/s")

        res = crop_dataset(raw, out, cfg, on_progress=tick, rank=rank, world=world,
                           barrier=dist.barrier if dist else None)
    if rank != 0:
        return
    secs = time.perf_counter() - t0
    table = Table(title=f"crop: {len(res.rows)} photos ({res.layout} layout) in {secs:.1f}s")
    table.add_column("status")
    table.add_column("photos", justify="right")
    for status, n in res.counts.items():
        if n:
            table.add_row(status, str(n))
    table.add_row("[dim]detected this run[/]", str(res.detected))
    table.add_row("[dim]reused from cache[/]", str(len(res.rows) - res.detected))
    console.print(table)
    for w in res.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    for r in res.rows:
        if r["status"] in ("unreadable", "missing", "bad_name"):
            console.print(f"[yellow]{r['status']}:[/] {r['source']}: {r['reason']}", highlight=False)
    console.print(f"manifest: {res.crops / 'manifest.csv'}")


if __name__ == "__main__":
    app()
