"""Connects a GradientMonitor to a training run: closes a window each epoch (or every N steps)
and keeps the windows as two tables in the run directory, which diagnosis and plots read back
(the tables' format and ``load_windows`` live in gradflow.analysis.windows).

    gradients.csv    one row per window and parameter, in the model's forward order (the
                     monitor's ``forward_order``: input side first, as diagnose_run reads it)
    activations.csv  one row per window and activation module

Example:
    >>> monitor = GradientMonitor(model, writer)
    >>> recorder = MonitorCallback(monitor, run_dir)
    >>> fit(..., callbacks=[recorder]); recorder.close()
    >>> windows = load_windows(run_dir)          # gradflow.analysis.windows: list[Window]
"""

from __future__ import annotations

import csv
from pathlib import Path

from gradflow.analysis.windows import (
    ACTIVATION_COLUMNS,
    ACTIVATIONS_FILE,
    GATE,
    GRADIENT_COLUMNS,
    GRADIENTS_FILE,
    VALUE_COLUMNS,
)
from gradflow.analysis.time_table import TIME_COLUMNS, TIME_FILE, time_rows
from gradflow.monitor import GradientMonitor, Window


class MonitorCallback:
    """Trainer callback: ``monitor.log`` at each epoch's end, or every ``window_steps`` steps.

    With ``window_steps`` the TensorBoard step of a window is the global step at its end;
    otherwise it is the epoch, like the ``epoch/*`` scalars. ``first_window`` > 0 resumes a run:
    the tables (already cut to that many windows) are appended to and numbering goes on.
    """

    def __init__(self, monitor: GradientMonitor, run_dir: str | Path | None = None, window_steps: int = 0,
                 first_window: int = 0) -> None:
        self.monitor = monitor
        self.window_steps = window_steps
        self.first_window = first_window
        self._tables = _Tables(Path(run_dir), append=first_window > 0) if run_dir is not None else None
        if window_steps:
            self.after_backward = self._log_every_n_steps   # only then does a step cost a call

    def _log_every_n_steps(self, step: int) -> None:
        # Called before the optimizer steps: the window holds steps up to step - 1.
        if step and step % self.window_steps == 0:
            self._log(step)

    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if not self.window_steps:
            self._log(epoch)

    def _log(self, step: int) -> None:
        self.monitor.log(step)
        if self._tables is not None:
            self._tables.append(self.first_window + len(self.monitor.history) - 1, self.monitor.history[-1],
                                _forward_order(self.monitor))

    def close(self) -> None:
        if self._tables is not None:
            self._tables.close()


class _Tables:
    """The two CSV files, appended to and flushed once per window."""

    def __init__(self, run_dir: Path, append: bool = False) -> None:
        mode = "a" if append else "w"
        # Resuming a table written before the kind column: append rows of its own shape, no gate rows.
        self._kinds = not append or _header_has(run_dir / GRADIENTS_FILE, "kind")
        self._files = [open(run_dir / name, mode, newline="") for name in (GRADIENTS_FILE, ACTIVATIONS_FILE)]
        self._gradients, self._activations = (csv.writer(f) for f in self._files)
        if not append:
            self._gradients.writerow(GRADIENT_COLUMNS)
            self._activations.writerow(ACTIVATION_COLUMNS)
        self._time_path, self._time = run_dir / TIME_FILE, None   # opened at the first window with a profile

    def append(self, index: int, window: Window, order: list[str] | None = None) -> None:
        for name, row in _in_order(window.gradients, order):
            cells = [index, window.step, row["steps"], name] + [_cell(row.get(key)) for key in VALUE_COLUMNS]
            self._gradients.writerow(cells + [window.kinds.get(name, "")] if self._kinds else cells)
            for gate, values in (window.gates.get(name, {}) if self._kinds else {}).items():
                self._gradients.writerow([index, window.step, values["steps"], f"{name}.{gate}"]
                                         + [_cell(values.get(key)) for key in VALUE_COLUMNS] + [GATE])
        for name, row in window.activations.items():
            self._activations.writerow([index, window.step, name]
                                       + [_cell(row.get(key)) for key in ACTIVATION_COLUMNS[3:]])
        rows = time_rows(index, window)
        if rows:
            self._time_table().writerows(rows)
        for f in self._files:
            f.flush()

    def _time_table(self):
        if self._time is None:
            new = not self._time_path.exists()
            self._files.append(open(self._time_path, "a", newline=""))
            self._time = csv.writer(self._files[-1])
            if new:
                self._time.writerow(TIME_COLUMNS)
        return self._time

    def close(self) -> None:
        for f in self._files:
            f.close()


def _header_has(path: Path, column: str) -> bool:
    if not path.exists():
        return True
    with open(path, newline="") as f:
        return column in next(csv.reader(f), [])


def _forward_order(monitor: GradientMonitor) -> list[str]:
    return list(getattr(monitor, "forward_order", None) or [])


def _in_order(rows: dict, order: list[str] | None) -> list:
    """``rows`` items in ``order`` where it names them, the rest after in their own order: the
    tables carry the forward order to diagnose_run, which has no model (old tables: as recorded)."""
    if not order:
        return list(rows.items())
    rank = {name: i for i, name in enumerate(order)}
    return sorted(rows.items(), key=lambda item: rank.get(item[0], len(rank)))


def _cell(value) -> str:
    return "" if value is None else repr(value)


class MembersMonitorCallback(MonitorCallback):
    """``MonitorCallback`` for a batched model (a monitor with ``members`` K): member k's
    windows go to the tables of ``run_dirs[k]``, as a solo run of that member would write them.

    A member that stopped (``member_stopped(k)``, called by ``batched.fit_batched``) writes no
    further windows.

    Example:
        >>> monitor = GradientMonitor(batched_model, writers, members=3)         # doctest: +SKIP
        >>> recorder = MembersMonitorCallback(monitor, [dir_0, dir_1, dir_2])    # doctest: +SKIP
        >>> fit_batched(..., callbacks=[recorder]); recorder.close()             # doctest: +SKIP
        >>> load_windows(dir_1)                      # member 1's windows        # doctest: +SKIP
    """

    def __init__(self, monitor: GradientMonitor, run_dirs: list[str | Path], window_steps: int = 0) -> None:
        super().__init__(monitor, None, window_steps)
        self._member_tables = [_Tables(Path(d)) for d in run_dirs]
        self._written = [0] * len(run_dirs)
        self._stopped: set[int] = set()

    def member_stopped(self, member: int) -> None:
        self._stopped.add(member)

    def _log(self, step: int) -> None:
        self.monitor.log(step)
        # log() appends one window per member, in member order (with members=1 the only one).
        windows = self.monitor.history[-len(self._member_tables):]
        for k, (tables, window) in enumerate(zip(self._member_tables, windows)):
            if k not in self._stopped:
                tables.append(self._written[k], window, _forward_order(self.monitor))
                self._written[k] += 1

    def member_windows(self, member: int) -> list[Window]:
        """Member k's windows, as its tables hold them (none after it stopped)."""
        return self.monitor.member_history(member)[:self._written[member]]

    def close(self) -> None:
        for tables in self._member_tables:
            tables.close()


# TensorBoard's Custom Scalars tab, in this order: what a newcomer asks first (did it learn?),
# then where the gradient goes, then why. Each chart matches tags by regex, so one layout fits
# every model: a tanh run has activation/tanh_N/saturated_fraction, a ReLU run
# activation/relu_N/dead_fraction, and the "units" chart shows whichever is there.
TENSORBOARD_LAYOUT = {
    "1. accuracy and loss": {
        "accuracy (train, val)": ["Multiline", [r"^epoch/(val_)?accuracy$"]],
        "loss (train, val)": ["Multiline", [r"^epoch/(val_)?loss$"]],
    },
    "2. gradient size per layer": {
        "mean |g| of each layer's weight (set the y axis to log)": ["Multiline", [r"^grad/.*/weight/mean_abs$"]],
        "max |g| of each layer's weight": ["Multiline", [r"^grad/.*/weight/max_abs$"]],
        "total gradient norm per step": ["Multiline", [r"^grad/total_norm(_before_clip)?$"]],
    },
    "3. weights and units": {
        "update ratio |w_end - w_start| / |w_start| per layer": ["Multiline", [r"^weight/.*/weight/update_ratio$"]],
        "saturated (tanh, sigmoid) or dead (ReLU) fraction": ["Multiline",
                                                              [r"^activation/.*/(saturated|dead)_fraction$"]],
        "non-finite gradient values": ["Multiline", [r"^grad/.*/nonfinite$"]],
    },
}


def write_tensorboard_layout(writer) -> None:
    """Give the run's TensorBoard a Custom Scalars tab laid out as ``TENSORBOARD_LAYOUT``.

    Example:
        >>> write_tensorboard_layout(SummaryWriter(run_dir))              # doctest: +SKIP
    """
    add = getattr(writer, "add_custom_scalars", None)
    if callable(add):
        add(TENSORBOARD_LAYOUT)
