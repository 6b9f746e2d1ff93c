"""Plots saved into the run directory. One function per figure; no pyplot global state.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, so plotting works on
headless machines and never opens a window.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return Path(path)


def plot_accuracy(history: Sequence[Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """Train and test accuracy per epoch, as the tutorial plots them; returns ``path``.

    Example:
        >>> import tempfile, os
        >>> out = os.path.join(tempfile.mkdtemp(), "accuracy.png")
        >>> plot_accuracy([{"epoch": 0, "accuracy": 0.5, "val_accuracy": 0.4}], out).name
        'accuracy.png'
    """
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    ax.plot(epochs, [row["accuracy"] for row in history], label="train")
    ax.plot(epochs, [row["val_accuracy"] for row in history], label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)
