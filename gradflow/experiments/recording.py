"""Connects a GradientMonitor to a training run: closes a window each epoch (or every N steps)
and keeps the windows as two tables in the run directory, which diagnosis and plots read back
(the tables' format and ``load_windows`` live in gradflow.analysis.windows).

    gradients.csv    one row per window and parameter, in the model's forward order (the
                     monitor's ``forward_order``: input side first, as diagnose_run reads it)
    activations.csv  one row per window and activation module

Example (not run as a doctest: it needs a whole training run, as ``gradflow.cli`` sets one up):
    >>> monitor = GradientMonitor(model, writer)                                   # doctest: +SKIP
    >>> recorder = MonitorCallback(monitor, run_dir)                               # doctest: +SKIP
    >>> fit(..., callbacks=[recorder]); recorder.close()                           # doctest: +SKIP
    >>> windows = load_windows(run_dir)  # gradflow.analysis.windows: list[Window]  # doctest: +SKIP
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from gradflow.analysis.time_table import TIME_COLUMNS, TIME_FILE, time_rows
from gradflow.analysis.windows import (
    ACTIVATION_COLUMNS,
    ACTIVATIONS_FILE,
    GATE,
    GRADIENT_COLUMNS,
    GRADIENTS_FILE,
    VALUE_COLUMNS,
)
from gradflow.monitor import GradientMonitor, Window
from gradflow.monitor.order import in_order
from gradflow.monitor.sinks import write_custom_scalars


class MonitorCallback:
    """Trainer callback: ``monitor.log`` at each epoch's end, or every ``window_steps`` steps.

    With ``window_steps`` the TensorBoard step of a window is the global step at its end;
    otherwise it is the epoch, like the ``epoch/*`` scalars. ``first_window`` > 0 resumes a run:
    the tables (already cut to that many windows) are appended to and numbering goes on.

    The run's first histogram holds its first window alone (the monitor's pool is flushed after
    it), then pooling goes on every ``histograms`` windows. With ``writer`` and ``flow_images`` N
    > 0 the gradient-flow picture of the windows so far (``earlier``, a resumed run's, first) goes
    to TensorBoard's Images tab at window N, 2N, ... and, by ``last_flow_image``, at the end.
    """

    def __init__(self, monitor: GradientMonitor, run_dir: str | Path | None = None, window_steps: int = 0,
                 first_window: int = 0, *, writer=None, flow_images: int = 0, earlier: Sequence[Window] = (),
                 title: str = "") -> None:
        self.monitor = monitor
        self.window_steps = window_steps
        self.first_window = first_window
        self.writer, self.flow_images, self.title = writer, flow_images, title
        self._earlier = list(earlier)
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
        index = self.first_window + len(self.monitor.history) - 1
        if self._tables is not None:
            self._tables.append(index, self.monitor.history[-1], _forward_order(self.monitor))
        if _first_or_pool_end(index, self.monitor.histograms):
            self.monitor.flush()
        if self.writer is not None and self.flow_images and index and index % self.flow_images == 0:
            # Not at window 0: matplotlib would load before the first epoch ends (tests/test_layout.py).
            add_flow_image(self.writer, self._earlier + self.monitor.history, step, self.title)

    def last_flow_image(self, step: int) -> None:
        """The flow picture of the whole run at its end, unless its last window already drew one."""
        index = self.first_window + len(self.monitor.history) - 1
        if self.writer is not None and self.flow_images and self.monitor.history and index % self.flow_images:
            add_flow_image(self.writer, self._earlier + self.monitor.history, step, self.title)

    def close(self) -> None:
        if self._tables is not None:
            self._tables.close()


class _Tables:
    """The two CSV files, appended to and flushed once per window."""

    def __init__(self, run_dir: Path, append: bool = False) -> None:
        mode = "a" if append else "w"
        # Resuming a table written before the kind column: append rows of its own shape, no gate rows.
        self._kinds = not append or _header_has(run_dir / GRADIENTS_FILE, "kind")
        self._files = [open(run_dir / name, mode, newline="")  # noqa: SIM115 - open until close()
                       for name in (GRADIENTS_FILE, ACTIVATIONS_FILE)]
        self._gradients, self._activations = (csv.writer(f) for f in self._files)
        if not append:
            self._gradients.writerow(GRADIENT_COLUMNS)
            self._activations.writerow(ACTIVATION_COLUMNS)
        self._time_path, self._time = run_dir / TIME_FILE, None   # opened at the first window with a profile

    def append(self, index: int, window: Window, order: list[str] | None = None) -> None:
        # in forward order: the tables carry it to diagnose_run, which has no model (old tables: as recorded)
        for name, row in in_order(window.gradients.items(), order, key=lambda item: item[0]):
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
            self._files.append(open(self._time_path, "a", newline=""))  # noqa: SIM115 - open for the run; close()
            self._time = csv.writer(self._files[-1])
            if new:
                self._time.writerow(TIME_COLUMNS)
        return self._time

    def close(self) -> None:
        for f in self._files:
            f.close()


def _first_or_pool_end(index: int, histograms) -> bool:
    """Whether the monitor's histogram pool should be written after window ``index`` (from 0):
    after the first window, so the run's first histogram holds it alone (epochs 0-10 are where
    vanishing shows), and then after windows N-1, 2N-1, ... for ``histograms`` N, so the pools
    keep their boundaries (epochs 0, 1-24, 25-49, ... for N = 25) and a resumed run's match."""
    if isinstance(histograms, bool) or not histograms:
        return False
    return index == 0 or (index + 1) % histograms == 0


def _header_has(path: Path, column: str) -> bool:
    if not path.exists():
        return True
    with open(path, newline="") as f:
        return column in next(csv.reader(f), [])


def _forward_order(monitor: GradientMonitor) -> list[str]:
    return list(getattr(monitor, "forward_order", None) or [])


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
        if _first_or_pool_end(len(self.monitor.history) // len(self._member_tables) - 1, self.monitor.histograms):
            self.monitor.flush()          # as a solo run's: the first window alone, then pools
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


# TensorBoard's Custom Scalars tab opens on what a newcomer asks first (did it learn?), then the
# monitor's categories (gradflow.monitor.sinks.custom_scalars_layout: where the gradient goes, layer
# by layer, then why). Each chart matches tags by regex, so one layout fits every run.
RUN_CHARTS = {
    "1. accuracy and loss": {
        "accuracy (train, val)": ["Multiline", [r"^epoch/(val_)?accuracy$"]],
        "loss (train, val)": ["Multiline", [r"^epoch/(val_)?loss$"]],
    },
}


def write_tensorboard_layout(writer, parameters: Sequence[str] = ()) -> dict:
    """Give the run's TensorBoard a Custom Scalars tab: ``RUN_CHARTS``, then the monitor's charts
    for ``parameters`` (the model's parameter names, input side first). Returns the layout.

    Example:
        >>> write_tensorboard_layout(SummaryWriter(run_dir), monitor.names)      # doctest: +SKIP
    """
    return write_custom_scalars(writer, parameters, first=RUN_CHARTS)


# -- the gradient-flow picture in TensorBoard's Images tab ---------------------------------------

FLOW_IMAGE_TAG = "gradient_flow"


def add_flow_image(writer, windows: Sequence[Window], step: int, title: str = "") -> None:
    """Draw the gradient-flow picture of ``windows`` (each layer's mean |g| against depth at a few
    epochs, gradflow.analysis.plots.draw_flow) and add it to ``writer``'s Images tab at ``step``."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from gradflow.analysis.plots import draw_flow

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    draw_flow(ax, windows)
    ax.set_ylabel("mean |gradient| of the layer's weight")
    ax.set_title(f"{title + ': ' if title else ''}gradient flow up to epoch {windows[-1].step}", fontsize="medium")
    ax.legend(fontsize="small")
    fig.tight_layout()
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3]
    writer.add_image(FLOW_IMAGE_TAG, image, step, dataformats="HWC")
