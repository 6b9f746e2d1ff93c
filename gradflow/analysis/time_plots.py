"""Pictures of the gradient through time (``Window.time``): ``through_time.png`` of one run, and
several runs on shared axes for ``gradflow compare``.

matplotlib (Agg canvas, no pyplot state) is imported inside the functions.

Example:
    >>> import os, tempfile, numpy as np
    >>> from gradflow.monitor import Window
    >>> w = [Window(i, 10, time={"rnn_1.l0": np.logspace(-9, 0, 50)}) for i in range(3)]
    >>> plot_through_time(w, os.path.join(tempfile.mkdtemp(), "through_time.png")).name
    'through_time.png'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradflow.analysis.plots import _save
from gradflow.analysis.windows import pick_windows
from gradflow.monitor.through_time import HORIZON_FRACTION, horizon

TIME_PLOT = "through_time.png"
MAX_PANELS = 4          # layers drawn (the first ones; a deep bidirectional stack has more)


def timed_windows(windows: Sequence[Any]) -> list[Any]:
    """The windows that hold a gradient-through-time profile."""
    return [w for w in windows if getattr(w, "time", None)]


def _draw_profile(ax, t: np.ndarray, values: np.ndarray, **style) -> None:
    """A profile on a log axis; exact zeros (underflow: nothing reached that step) as x marks on
    the bottom edge, never silently left out."""
    ax.plot(t, np.where(values > 0, values, np.nan), **style)
    zero = values == 0
    if zero.any():
        ax.plot(t[zero], np.zeros(zero.sum()), "x", color=style.get("color"), markersize=3,
                transform=ax.get_xaxis_transform(), clip_on=False)


def plot_through_time(windows: Sequence[Any], path: str | Path, title: str = "") -> Path:
    """``through_time.png``: ||dL/dh_t|| against the time step t (log scale), one panel per
    recurrent layer and direction (up to MAX_PANELS), one line per chosen window (the first, a
    few early ones, the last: ``windows.pick_windows``). Zeros (the gradient underflowed) are x
    marks on the bottom edge. Raises ValueError when no window has a profile."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    timed = timed_windows(windows)
    if not timed:
        raise ValueError("plot_through_time: no window has a gradient-through-time profile (no nn.RNN/LSTM/GRU)")
    keys = list(dict.fromkeys(k for w in timed for k in w.time))[:MAX_PANELS]
    indices = pick_windows(timed, early=True)
    colours = colormaps["plasma"](np.linspace(0, 0.85, len(indices)))
    fig = Figure(figsize=(5.2 * len(keys), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(keys), sharey=True, squeeze=False)[0])
    for ax, key in zip(axes, keys):
        for colour, index in zip(colours, indices):
            profile = timed[index].time.get(key)
            if profile is None:
                continue
            values = np.asarray(profile, dtype=np.float64)
            _draw_profile(ax, np.arange(len(values)), values, color=colour, linewidth=1.4,
                          label=f"epoch {timed[index].step} (horizon {horizon(values)})")
        ax.set_yscale("log")
        ax.set_xlabel("time step t (0 = first)")
        ax.set_title(key)
        ax.legend(fontsize="small", loc="best")
    axes[0].set_ylabel("||dL/dh_t|| (mean over profiled steps)")
    fig.suptitle(f"{title + ': ' if title else ''}gradient through time (horizon: steps within "
                 f"{HORIZON_FRACTION:g} of the largest)")
    return _save(fig, path)


def plot_compare_through_time(runs: Sequence[Any], path: str | Path) -> Path:
    """Several runs' profiles on shared axes: each run's last profiled window, its first
    recurrent layer, ||dL/dh_t|| over its largest against the distance from the last step
    (T - 1 - t), so that runs of different lengths line up at the loss. ``runs``: objects with
    ``name`` and ``windows`` (``compare.Run``). Raises ValueError when no run has a profile."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    drawn = [(run, timed_windows(run.windows)[-1]) for run in runs if timed_windows(run.windows)]
    if not drawn:
        raise ValueError("no run has a gradient-through-time profile (through_time.csv)")
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    colours = colormaps["viridis"](np.linspace(0, 0.9, len(drawn)))
    styles = ("-", "--", "-.", ":")
    for i, (colour, (run, window)) in enumerate(zip(colours, drawn)):
        key = next(iter(window.time))
        values = np.asarray(window.time[key], dtype=np.float64)
        top = np.nanmax(values) if values.size else 0.0
        relative = values / top if top > 0 else values
        back = np.arange(len(values))[::-1] if not key.endswith("_reverse") else np.arange(len(values))
        _draw_profile(ax, back, relative, color=colour, linestyle=styles[i % len(styles)],
                      label=f"{run.name} ({key}, horizon {horizon(values)} of {len(values)})")
    ax.set_yscale("log")
    ax.set_xlabel("steps back from the last time step")
    ax.set_ylabel("||dL/dh_t|| / its largest (last window)")
    ax.set_title("gradient through time")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def add_to_tensorboard(path: str | Path, writer: Any, step: int, tag: str = "through_time") -> None:
    """Write the PNG at ``path`` to TensorBoard's Images tab under ``tag`` at ``step``."""
    from matplotlib.image import imread

    image = imread(str(path))[..., :3]          # RGBA floats in [0, 1] -> RGB
    writer.add_image(tag, image, step, dataformats="HWC")
