"""Figures, written atomically as PNG (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from preprocess.imageio import atomic_write_bytes


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    pyplot().close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def plot_confusion(path: Path, cm: np.ndarray, names: list[str], title: str, blocks: int = 0) -> None:
    """A confusion matrix with its counts; `blocks`: draw a line every `blocks` classes (6: between
    the mask statuses of the 18 classes)."""
    plt = pyplot()
    size = (11, 9.5) if len(names) > 6 else (4.2, 3.8)
    fig, ax = plt.subplots(figsize=size, dpi=100)
    ax.imshow(cm, cmap="Blues")
    for b in range(blocks, len(names), blocks or len(names)):
        ax.axhline(b - 0.5, color="#333333", linewidth=1.2)
        ax.axvline(b - 0.5, color="#333333", linewidth=1.2)
    ax.set_xticks(range(len(names)), names, rotation=75, fontsize=7, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix: {title}")
    fig.tight_layout()
    save_figure(fig, path)


MASK_COLOURS = ("#4c72b0", "#dd8452", "#55a868")  # wear, incorrect, not wear: every per-class figure
ABSENT = "#cccccc"


def mask_legend(ax, absent: bool = False) -> None:
    """The legend of a per-class figure coloured by mask status (and grey for absent classes)."""
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=n) for c, n in zip(MASK_COLOURS, ("mask worn", "worn incorrectly", "no mask"))]
    if absent:
        handles.append(Patch(color=ABSENT, label="absent"))
    ax.legend(handles=handles, fontsize=8, loc="upper right", ncol=len(handles), frameon=False)


def short(s: str, n: int = 28) -> str:
    """The whole of `s` (an image id: the person's folder and the file) in lines of at most n characters,
    broken after a '/' or '_' where it can be: two photos named normal.jpg, or two people whose ids end
    alike, stay apart (an ellipsis once cut their start off)."""
    lines, line = [], ""
    for piece in re.findall(r"[^/_]*[/_]|[^/_]+$", s):
        while len(piece) > n:
            if line:
                lines.append(line)
                line = ""
            lines.append(piece[:n])
            piece = piece[n:]
        if len(line) + len(piece) > n:
            lines.append(line)
            line = ""
        line += piece
    return "\n".join(lines + [line] if line else lines)
