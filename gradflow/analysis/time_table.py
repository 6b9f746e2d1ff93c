"""The run directory's ``through_time.csv``: each window's gradient through time (``Window.time``),
writer and reader side by side.

    through_time.csv   one row per window, recurrent layer key and time step:
                       window, step, layer ("lstm_1.l0", "lstm_1.l0_reverse"), cell (RNN_TANH,
                       RNN_RELU, LSTM, GRU), t (0 = the first time step), norm (the window's mean
                       over profiled passes of ||dL/dh_t||_2)

Written only by runs whose model has an nn.RNN/LSTM/GRU (gradflow.monitor.through_time).

Example:
    >>> from gradflow.monitor import Window
    >>> import numpy as np
    >>> w = Window(0, 5, time={"rnn_1.l0": np.array([1e-3, 1.0])}, time_cells={"rnn_1.l0": "RNN_TANH"})
    >>> time_rows(0, w)[1]
    [0, 0, 'rnn_1.l0', 'RNN_TANH', 1, '1.0']
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

TIME_FILE = "through_time.csv"
TIME_COLUMNS = ("window", "step", "layer", "cell", "t", "norm")


def time_rows(index: int, window: Any) -> list[list]:
    """The rows of one window (none when it has no profile)."""
    cells = getattr(window, "time_cells", {}) or {}
    return [[index, window.step, key, cells.get(key, ""), t, repr(float(value))]
            for key, profile in (getattr(window, "time", {}) or {}).items() for t, value in enumerate(profile)]


def read_time_table(run_dir: str | Path, windows: Mapping[int, Any]) -> None:
    """Fill ``window.time`` and ``window.time_cells`` of ``windows`` (window index -> Window) from
    the run's through_time.csv, if it has one."""
    path = Path(run_dir) / TIME_FILE
    if not path.exists():
        return
    values: dict[tuple[int, str], dict[int, float]] = {}
    cells: dict[tuple[int, str], str] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            key = (int(row["window"]), row["layer"])
            values.setdefault(key, {})[int(row["t"])] = float(row["norm"])
            cells[key] = row["cell"]
    for (index, layer), by_t in values.items():
        window = windows.get(index)
        if window is None:
            continue
        profile = np.full(max(by_t) + 1, np.nan)
        profile[list(by_t)] = list(by_t.values())
        window.time[layer] = profile
        window.time_cells[layer] = cells[(index, layer)]
