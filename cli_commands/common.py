"""What every maskcls command shares: the console, the one-line error, warnings, the progress bar and
the options that predict, evaluate and pseudo-label declare alike."""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import time
from pathlib import Path

import typer
from typer.core import TyperCommand, TyperGroup
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

console = Console(stderr=True)


@contextlib.contextmanager
def one_line_usage_errors():
    """A mistake on the command line (an unknown option or command, a missing argument, a value of the wrong
    type) as one `error:` line and exit code 1, like every other user mistake, instead of typer's boxed usage
    and exit code 2. `maskcls` alone still prints the help."""
    try:
        yield
    except typer.TyperException as e:
        if type(e).__name__ == "NoArgsIsHelpError" or not hasattr(e, "format_message"):
            raise
        ctx = getattr(e, "ctx", None)
        hint = f" ({ctx.command_path} --help lists what it takes)" if ctx is not None else ""
        message = " ".join(str(e.format_message()).split())
        console.print(f"[bold red]error:[/] {escape(message)}{escape(hint)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


class Command(TyperCommand):
    """A command whose usage line names its arguments as the help does (`crop [OPTIONS] RAW`): typer
    writes a required one as `{RAW}`, which reads as a set or a placeholder to fill in; and whose
    command-line mistakes are one `error:` line (`one_line_usage_errors`)."""

    def collect_usage_pieces(self, ctx):
        pieces = [re.sub(r"\{([^{}]*)\}", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]
        # 'CKPT... RAW_OR_CROPS' already says which part repeats: no '...' after the whole metavar
        return [p[:-3] if p.endswith("...") and "..." in p[:-3] else p for p in pieces]

    def make_context(self, info_name, args, parent=None, **extra):
        if parent is None:  # parsed by a caller (tune parses train's options), which words the error itself
            return super().make_context(info_name, args, parent=parent, **extra)
        with one_line_usage_errors():
            return super().make_context(info_name, args, parent=parent, **extra)


class Group(TyperGroup):
    """The `maskcls` group: an unknown command or group option is one `error:` line too."""

    def make_context(self, info_name, args, parent=None, **extra):
        with one_line_usage_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def resolve_command(self, ctx, args):
        with one_line_usage_errors():
            return super().resolve_command(ctx, args)

TTA = typer.Option(1, help="Views averaged: 1 none, 2 + mirror, 3 + zoom, 4 + zoomed mirror. "
                           "--tta alone is not valid: give a number.")
CROP_CACHE = typer.Option(None, help="Where raw photos are cropped (default: one folder per photos and crop settings "
                                     "under ~/.cache/maskcls/crops).")
DEVICE = typer.Option("auto", help="auto | cpu | cuda.")
BATCH = typer.Option(64, help="Images per forward pass.")
WORKERS = typer.Option(None, help="DataLoader worker processes (checkpoints only) [default: 2].")
VOTE = typer.Option("soft", help="Several models: soft (mean probability) | hard (majority of top classes).")
CALIBRATE = typer.Option(True, "--calibrate/--no-calibrate", metavar="",
                         help="Apply each checkpoint's fitted temperature to its probabilities.")


# What each optional part imports, and the extra (pyproject's optional-dependencies) that brings it.
EXTRAS = {"export": ("onnx", "onnxscript", "onnxruntime"), "serve": ("onnxruntime", "fastapi", "starlette", "uvicorn", "pydantic"),
          "tune": ("optuna",), "explain": ("pytorch_grad_cam",), "timm": ("timm",), "audit": ("cleanlab",)}


def require_extra(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Refuse, before any work, a command whose extra (or `modules` of it) is not installed: one line
    naming the extra to install."""
    import importlib.util

    from classify.errors import ConfigError

    missing = [m for m in modules or EXTRAS[extra] if _find(importlib.util, m) is None]
    if missing:
        raise ConfigError(f"{what} needs the {extra} extra ({', '.join(missing)} not installed): "
                          f"pip install 'maskcls[{extra}]'")


def _find(util, module: str):
    try:
        return util.find_spec(module)
    except (ImportError, ValueError):  # a parent that is not a package; a module without a spec
        return None


# In a folder a command reads (a run, a crops folder, an eval folder): the files it reads there. A file option
# naming one of them would overwrite the command's own input.
READ_NAMES = {"manifest.csv", "crops.json", "info.csv", "labels.csv", "train.csv", "config.json", "summary.json",
              "split.csv", "metrics.csv", "val_predictions.csv", "val_predictions_last.csv", "oof_predictions.csv"}
READ_SUFFIXES = {".pt", ".pth", ".npz", ".npy", ".jpg", ".jpeg", ".png"}
MODEL_SUFFIXES = {".pt", ".pth", ".onnx"}


def check_outputs(folders: dict | None = None, files: dict | None = None, reads=(), model_out: bool = False) -> None:
    """Refuse, before any work, an output option that cannot be written: a folder option given an existing
    file, a file option given a folder, or a path below a file. `folders`/`files`: {option: path or None}.

    Also refused, as they would destroy data: two file options naming one file (the last written replaced the
    other: `--out s.csv --probs s.csv` left a submission of probabilities); a file option naming a file the
    command reads (`reads`: the models, run folders and photo or crops folders it was given; `predict m.onnx
    eval --out m.onnx` replaced the model, `export RUN --out RUN/best.pt` the checkpoint); and, where the
    option writes no model (`model_out` False), an existing checkpoint or ONNX file."""
    from classify.errors import ConfigError

    for kind, given in (("folder", folders or {}), ("file", files or {})):
        for option, path in given.items():
            if path is None:
                continue
            path = Path(path)
            blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
            if kind == "folder" and blocker == path:
                raise ConfigError(f"{option} {path} is a file: give a folder (a new one, or one this command wrote)")
            if kind == "file" and path.is_dir():
                raise ConfigError(f"{option} {path} is a folder: give a file name inside it")
            if blocker is not None and blocker != path:
                raise ConfigError(f"{option} {path}: {blocker} is a file, so nothing can be written below it")
    named: dict[str, str] = {}
    for option, path in (files or {}).items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in named:
            raise ConfigError(f"{named[real]} and {option} name the same file ({path}): give each its own, or the "
                              "last one written replaces the other")
        named[real] = option
        what = _read_by(Path(real), reads)
        if what:
            raise ConfigError(f"{option} {path} is {what}: writing there would destroy it; give another file name")
        if not model_out and Path(real).is_file() and Path(real).suffix.lower() in MODEL_SUFFIXES:
            raise ConfigError(f"{option} {path} is a model file: writing there would destroy it; give another file "
                              "name")


def _read_by(target: Path, reads) -> str | None:
    """What `target` (a real path) is among the inputs `reads`, or None when the command does not read it."""
    for given in reads:
        real = Path(os.path.realpath(given))
        if target == real:
            return f"this command's input {given}"
        if real.is_dir() and real in target.parents and target.exists() and (
                target.name in READ_NAMES or target.suffix.lower() in READ_SUFFIXES):
            return f"part of {given}, which this command reads"
    return None


WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}
ACCESS_ERRNOS = {errno.EACCES, errno.EPERM}


def user_errors(fn):
    """Turn the project's own errors (a user's mistake, not a bug) and the file system's refusals
    (no space, read-only, no permission, no such file) into one line and exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from classify.errors import USER_ERRORS
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            console.print(f"interrupted: `maskcls {fn.__name__.replace('_runs', '').replace('_', '-')}` stopped. What it had written is whole "
                          "(files are written under temporary names and renamed); rerun the same command to continue "
                          "(crop resumes from its journal; train: add --resume)", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except USER_ERRORS as e:
            if isinstance(e, OSError) and e.filename:  # name the file the user knows, not a temporary one
                e = f"{_user_path(e.filename)}: {e.strerror or e}"
            line = f"{e}"
        except OSError as e:
            where = f" {_user_path(e.filename)}" if e.filename else ""
            if e.errno in WRITE_ERRNOS:
                line = (f"cannot write{where}: {e.strerror or e}. Files written before (manifest, checkpoints) are "
                        "left as they were.")
            elif e.errno in ACCESS_ERRNOS:
                line = (f"cannot write or read{where}: {e.strerror or e} (check the folder's permissions). Files "
                        "written before (manifest, checkpoints) are left as they were.")
            else:
                raise
        console.print(f"[bold red]error:[/] {escape(str(line))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    return wrapper


def _user_path(filename) -> str:
    """The file a user asked for, not the temporary name it is written under ('.manifest.csv.x1y2.tmp')."""
    p = Path(str(filename))
    m = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", p.name)
    return str(p.parent / m[1]) if m else str(p)


def warning(message: str) -> None:
    """One warning line; the message (paths, library text) is printed as it is, never read as markup."""
    console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


class LazyProgress:
    """A rich progress bar that appears on the first update, so a command that fails before any
    work prints only its error. `update(done, total)` shows photos/s and the ETA."""

    def __init__(self, what: str, unit: str = "photos"):
        self.what, self.unit, self.bar, self.task, self.t0 = what, unit, None, None, time.perf_counter()

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = Progress(TextColumn(f"[bold]{self.what}"), BarColumn(), MofNCompleteColumn(),
                                TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                console=console)
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=total, rate="")
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, completed=done, total=total, rate=f"{rate:.1f} {self.unit}/s")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def models_line(models: list[str]) -> str:
    return f"{len(models)} model(s): " + escape(", ".join(models))
