"""The recorded windows of a run directory: the format of gradients.csv and activations.csv,
and reading them back as the monitor's ``Window`` objects (what diagnosis and plots read).

    gradients.csv    one row per window and parameter (input layer first); its ``kind`` column
                     says what owns the parameter (gradflow.monitor.kinds: linear, conv, norm,
                     embedding, embedding+head, recurrent, attention, other); LSTM/GRU weights
                     are followed by one ``gate`` row per gate, named ``<parameter>.<gate>``
                     (``lstm.weight_hh_l0.forget``), with ``norm``, ``weight_norm`` and ``steps``
    activations.csv  one row per window and activation module
    through_time.csv recurrent runs: each window's gradient through time (time_table.py)

Example:
    >>> windows = load_windows("runs/deep_relu-20250101-120000-seed0")   # doctest: +SKIP
    >>> windows[0].gradients["dense_1.weight"]["mean_abs"]              # doctest: +SKIP
    0.21
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradflow.analysis.time_table import read_time_table
from gradflow.monitor import Window
from gradflow.monitor.kinds import GATE  # the kind of a gate row (gradflow.monitor.gates)

GRADIENT_COLUMNS = ("window", "step", "steps", "parameter", "mean", "mean_abs", "norm", "max_abs",
                    "zero_fraction", "nonfinite", "weight_l1", "weight_norm", "weight_update_ratio",
                    "skipped_steps", "kind")   # the last two: tables written before them still read (and resume)
VALUE_COLUMNS = GRADIENT_COLUMNS[4:-1]     # the numbers of a row
ACTIVATION_COLUMNS = ("window", "step", "module", "mean", "std", "saturated_fraction", "dead_fraction")
GRADIENTS_FILE = "gradients.csv"
ACTIVATIONS_FILE = "activations.csv"


def load_windows(run_dir: str | Path) -> list[Window]:
    """The windows a run recorded, read back from its gradients.csv and activations.csv: gate
    rows go to ``Window.gates``, the ``kind`` column to ``Window.kinds`` (empty for tables
    written before it existed: the analysis then tells kinds by name)."""
    run_dir = Path(run_dir)
    windows: dict[int, Window] = {}
    with open(run_dir / GRADIENTS_FILE, newline="") as f:
        for row in csv.DictReader(f):
            window = windows.setdefault(int(row["window"]), Window(step=int(row["step"]), steps=int(row["steps"])))
            values = {key: _number(row[key]) for key in VALUE_COLUMNS if row.get(key) not in (None, "")}
            kind = row.get("kind") or ""
            if kind == GATE:
                parameter, _, gate = row["parameter"].rpartition(".")
                window.gates.setdefault(parameter, {})[gate] = {
                    "norm": values.get("norm"), "weight_norm": values.get("weight_norm"), "steps": int(row["steps"])}
                continue
            if kind:
                window.kinds[row["parameter"]] = kind
            values["steps"] = int(row["steps"])
            window.steps = max(window.steps, values["steps"])
            window.gradients[row["parameter"]] = values
            skipped = max(window.overall.get("skipped_steps", 0), int(values.get("skipped_steps", 0)))
            window.overall = {"steps": window.steps, "skipped_steps": skipped}
    activations = run_dir / ACTIVATIONS_FILE
    if activations.exists():
        with open(activations, newline="") as f:
            for row in csv.DictReader(f):
                window = windows.get(int(row["window"]))
                if window is not None:
                    window.activations[row["module"]] = {
                        key: _number(row[key]) for key in ACTIVATION_COLUMNS[3:] if row[key] != ""}
    read_time_table(run_dir, windows)      # recurrent runs: through_time.csv (time_table.py)
    return [windows[i] for i in sorted(windows)]


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def pick_windows(windows: Sequence[Any], steps: Sequence[int] | None = None, *, early: bool = False) -> list[int]:
    """Indices of the windows a figure draws: those at ``steps`` (epochs); else the first, the
    middle and the last; or, with ``early``, the first, a few early ones (where a failing run's
    gradients decide its fate: the 11th window and the one a fifth of the way in) and the last,
    as the gradient-flow and through-time pictures show. Raises ValueError naming the recorded
    epochs when a step has no window.

    Example:
        >>> pick_windows([Window(s, 1) for s in range(10)])
        [0, 5, 9]
        >>> pick_windows(list(range(500)), early=True), pick_windows(list(range(3)), early=True)
        ([0, 10, 99, 499], [0, 2])
    """
    if steps:
        by_step = {w.step: i for i, w in enumerate(windows)}
        missing = [s for s in steps if s not in by_step]
        if missing:
            raise ValueError(f"no window at epoch(s) {missing}; recorded: {windows[0].step}..{windows[-1].step}")
        return [by_step[s] for s in steps]
    last = len(windows) - 1
    chosen = {0, min(last, 10), last // 5, last} if early else {0, len(windows) // 2, last}
    return sorted(i for i in chosen if 0 <= i <= last)      # none of none
