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


def plot_gradients(windows: Sequence, path: str | Path, title: str = "", statistic: str = "mean_abs") -> Path:
    """Per-layer weight-gradient size per epoch on a log scale (``gradients.png``).

    One line per layer, input layer to output layer from dark to light, as the tutorial's
    TensorBoard view compares ``dense_1`` with the output layer. A window where a layer's
    gradient is exactly zero (dead units) cannot sit on a log axis: it is marked with an x on
    the bottom edge instead of vanishing silently.

    Example:
        >>> import tempfile, os
        >>> from gradflow.monitor import Window
        >>> w = Window(step=0, steps=1, gradients={"dense_1.weight": {"mean_abs": 0.1}})
        >>> plot_gradients([w], os.path.join(tempfile.mkdtemp(), "gradients.png")).name
        'gradients.png'
    """
    import numpy as np
    from matplotlib import colormaps

    names = list(dict.fromkeys(n for w in windows for n in w.gradients if n.endswith("weight")))
    names = names or list(dict.fromkeys(n for w in windows for n in w.gradients))
    colours = colormaps["viridis"](np.linspace(0, 0.9, max(len(names), 1)))
    fig = Figure(figsize=(7.2, 4.8))
    ax = fig.add_subplot()
    for colour, name in zip(colours, names):
        points = [(w.step, w.gradients[name][statistic]) for w in windows if name in w.gradients]
        steps = np.array([s for s, _ in points], dtype=float)
        values = np.array([v for _, v in points], dtype=float)
        positive = values > 0
        ax.plot(steps, np.where(positive, values, np.nan), color=colour, label=name.rpartition(".")[0] or name)
        zero = values == 0
        if zero.any():
            ax.plot(steps[zero], np.zeros(zero.sum()), "x", color=colour, transform=ax.get_xaxis_transform(),
                    clip_on=False, markersize=4)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{statistic.replace('_', ' ')} of the weight gradient")
    ax.set_title(title or "gradient size per layer")
    if names:
        ax.legend(fontsize="small", ncol=2 if len(names) > 8 else 1)
    return _save(fig, path)
