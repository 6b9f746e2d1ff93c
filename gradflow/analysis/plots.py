"""Plots saved into the run directory. One function per figure; no pyplot global state.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, so plotting works on
headless machines and never opens a window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gradflow.analysis.windows import pick_windows
from gradflow.monitor.order import layer_of


def _save(fig: Figure, path: str | Path, tight: bool = True) -> Path:
    """Save as PNG. ``tight`` crops to what was drawn, which costs a second draw: a figure whose
    artists all sit inside fixed margins passes False (a batched run saves one per member)."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight" if tight else None)
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
    ax.set_ylim(0, 1)  # fixed: a failing run at 0.45-0.60 must not fill the axis like steady learning
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right")  # below the curves: accuracy starts near 0.5 and rises
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93)   # everything inside: one draw, not two
    return _save(fig, path, tight=False)


def weight_layers(windows: Sequence) -> list[str]:
    """The weight parameters in recording order (input layer first), else every parameter."""
    names = list(dict.fromkeys(n for w in windows for n in w.gradients if n.endswith("weight")))
    return names or list(dict.fromkeys(n for w in windows for n in w.gradients))


LABELS = {"relative": "||g|| / ||w||", "mean_abs": "mean |g|", "max_abs": "max |g|", "norm": "||g||"}


def statistic_of(windows: Sequence, statistic: str = "relative") -> str:
    """``relative`` (||g|| / ||w||, the size diagnose judges) when every row has a gradient
    and a weight norm, else ``mean_abs`` (old tables); any other statistic as asked."""
    if statistic != "relative":
        return statistic
    rows = [row for w in windows for row in w.gradients.values()]
    ok = all("norm" in row and isinstance(row.get("weight_norm"), (int, float)) for row in rows)
    return "relative" if ok else "mean_abs"


def size(row: Mapping[str, float], statistic: str) -> float:
    """One row's ``statistic``; ``relative`` is norm / weight_norm (NaN for a zero weight)."""
    if statistic == "relative":
        weight = row.get("weight_norm", float("nan"))
        return row.get("norm", float("nan")) / weight if weight and weight > 0 else float("nan")
    return float(row.get(statistic, float("nan")))


def draw_flow(ax, windows: Sequence, statistic: str = "relative", indices: Sequence[int] | None = None) -> None:
    """The classic gradient-flow picture on ``ax``: each layer's weight-gradient size against
    depth (input layer left, output layer right), one line per chosen epoch, log scale. The
    size is ``statistic`` (default ||g|| / ||w||, what diagnose judges; ``statistic_of``). A
    layer whose gradient is exactly zero is drawn on the bottom edge with an x."""
    import numpy as np
    from matplotlib import colormaps

    statistic = statistic_of(windows, statistic)

    names = weight_layers(windows)
    indices = pick_windows(windows, early=True) if indices is None else list(indices)
    colours = colormaps["plasma"](np.linspace(0, 0.85, max(len(indices), 1)))
    x = np.arange(len(names))
    for colour, index in zip(colours, indices):
        rows = windows[index].gradients
        values = np.array([size(rows[n], statistic) if n in rows else np.nan for n in names])
        ax.plot(x, np.where(values > 0, values, np.nan), "o-", color=colour, markersize=4,
                label=f"epoch {windows[index].step}")
        zero = values == 0
        if zero.any():
            ax.plot(x[zero], np.zeros(zero.sum()), "x", color=colour, transform=ax.get_xaxis_transform(),
                    clip_on=False, markersize=5)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([layer_of(n) for n in names], rotation=45, ha="right", fontsize="small")
    ax.set_xlabel("layer (input -> output)")


def plot_gradients(windows: Sequence, path: str | Path, title: str = "", statistic: str = "relative") -> Path:
    """Per-layer weight-gradient size per epoch on a log scale (``gradients.png``), and beside
    it, on the same y axis, the gradient-flow picture: size against depth at a few epochs.

    The size is ``statistic``: by default ||g|| / ||w|| of each weight (the measure diagnose
    judges, so the picture and the verdict agree in direction), mean |g| for tables without
    weight norms; the y axis names it.

    Left: one line per layer, input layer to output layer from dark to light (and dashes
    cycling so that neighbours differ), as the tutorial's
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

    statistic = statistic_of(windows, statistic)
    names = weight_layers(windows)
    colours = colormaps["viridis"](np.linspace(0, 0.9, max(len(names), 1)))
    fig = Figure(figsize=(13, 4.8))
    ax, flow = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    styles = ("-", "--", "-.", ":")     # neighbouring layers differ in dash as well as shade
    for i, (colour, name) in enumerate(zip(colours, names)):
        points = [(w.step, size(w.gradients[name], statistic)) for w in windows if name in w.gradients]
        steps = np.array([s for s, _ in points], dtype=float)
        values = np.array([v for _, v in points], dtype=float)
        positive = values > 0
        ax.plot(steps, np.where(positive, values, np.nan), color=colour, linestyle=styles[i % len(styles)],
                label=layer_of(name))
        zero = values == 0
        if zero.any():
            ax.plot(steps[zero], np.zeros(zero.sum()), "x", color=colour, transform=ax.get_xaxis_transform(),
                    clip_on=False, markersize=4)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{LABELS.get(statistic, statistic)} of each layer's weight"
                  + (" (what diagnose judges)" if statistic == "relative" else ""))
    ax.set_title(f"{title + ': ' if title else ''}gradient size per layer")
    if names:  # off the data: the legend sits to the left of the flow panel's axis
        ax.legend(fontsize="small", ncol=2 if len(names) > 8 else 1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if windows:
        draw_flow(flow, windows, statistic)
        flow.tick_params(labelleft=True)   # shared y axis, but read on its own too
        flow.set_title("gradient flow: size against depth")
        flow.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.subplots_adjust(wspace=0.45)
    return _save(fig, path)
