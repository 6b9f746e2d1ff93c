"""What a finished run leaves in its run directory, written in this one place for a solo run and
for each member of a batched run alike: history.csv, summary.json, accuracy.png, gradients.png,
through_time.png (recurrent models) and the verdict (in summary.json, and as TensorBoard scalars when the run's writer is open).

config.yaml is written when the directory is created (rundir.write_config), and the monitor's
tables while training (recording); this module reads neither back except through ``windows``.

Example:
    >>> summary, diagnosis = write_outputs(run_dir, cfg, result, monitor.history, writer=writer)  # doctest: +SKIP
    >>> summary["verdict"]                                                                      # doctest: +SKIP
    ['healthy']
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gradflow.analysis.diagnose import Diagnosis, diagnose, write_to_tensorboard
from gradflow.analysis.history import write_history
from gradflow.analysis.plots import plot_accuracy, plot_gradients
from gradflow.experiments.config import Config
from gradflow.experiments.rundir import write_summary
from gradflow.experiments.train import TrainResult


def write_outputs(run_dir: str | Path, cfg: Config, result: TrainResult, windows: Sequence[Any], *,
                  writer: Any = None, stopped_by: signal.Signals | None = None, members: int | None = None,
                  title: str = "", gradients_plot: bool = True) -> tuple[dict[str, Any], Diagnosis | None]:
    """Diagnose ``windows`` (none: no verdict), then write the run's files; returns (summary, diagnosis).

    ``members``: ``result`` is one member of a batched run of that many (its seconds are
    the member's share). ``gradients_plot=False`` leaves out gradients.png (batched members, as
    before the move: one figure per seed is most of a short member's writing time).
    """
    run_dir = Path(run_dir)
    diagnosis = None
    if windows:
        diagnosis = diagnose(windows, [row["loss"] for row in result.history], optimizer=cfg.optimizer.name,
                             context="run", nonfinite_part=members is None)   # solo runs look for it (solo.py)
        if writer is not None:
            write_to_tensorboard(diagnosis, writer, result.history[-1]["epoch"] if result.history else 0)
    summary = run_summary(cfg, result, windows, stopped_by, diagnosis, members)
    write_history(run_dir, result.history)
    write_summary(run_dir, summary)
    plot_accuracy(result.history, run_dir / "accuracy.png", title=title or cfg.name)
    if windows and gradients_plot:
        plot_gradients(windows, run_dir / "gradients.png", title=title or cfg.name)
    if any(getattr(w, "time", None) for w in windows):      # recurrent layers (issue 22)
        from gradflow.analysis.time_plots import TIME_PLOT, add_to_tensorboard, plot_through_time

        picture = plot_through_time(windows, run_dir / TIME_PLOT, title=title or cfg.name)
        if writer is not None:
            add_to_tensorboard(picture, writer, result.history[-1]["epoch"] if result.history else 0)
    return summary, diagnosis


def run_summary(cfg: Config, result: TrainResult, windows: Sequence[Any] = (), stopped_by: signal.Signals | None = None,
                diagnosis: Diagnosis | None = None, members: int | None = None) -> dict[str, Any]:
    """What summary.json holds (a batched member's also says ``batched``: members and total seconds)."""
    nonfinite = [(i, sum(row.get("nonfinite", 0) for row in w.gradients.values())) for i, w in enumerate(windows)]
    summary = {
        "name": cfg.name,
        "train_accuracy": result.train_accuracy,
        "test_accuracy": result.test_accuracy,
        "epochs": result.epochs_run,
        "seconds": round(result.seconds / (members or 1), 3),  # a batched member: its share of the batched run
        "seed": cfg.train.seed,
        "device": result.device,
        "stopped_early": result.stopped_early,
        "stop_epoch": result.stop_epoch,
        "stop_reason": result.stop_reason,
        "interrupted": stopped_by.name if result.interrupted and stopped_by is not None else None,
        # The monitor's count of NaN/inf gradient elements, in all and per window.
        "nonfinite_gradients": sum(count for _, count in nonfinite),
        "first_nonfinite_window": next((i for i, count in nonfinite if count), None),
        # Where the first NaN/inf came from (module, phase, step, window), as the verdict says it.
        "first_nonfinite": diagnosis.evidence.get("first_nonfinite") if diagnosis is not None else None,
        "verdict": list(diagnosis.verdicts) if diagnosis is not None else None,
        "verdict_line": diagnosis.line() if diagnosis is not None else None,
        "recommendation": diagnosis.recommendation if diagnosis is not None else None,
        "torch_version": torch.__version__,
    }
    if members is not None:
        summary["batched"] = {"members": members, "seconds": round(result.seconds, 3)}
    return summary
