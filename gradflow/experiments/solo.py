"""A solo run, start to finish: open its run directory (new, or ``--resume`` an old one), train
with the gradient monitor recording into it, stop cleanly on SIGINT/SIGTERM with a checkpoint,
and hand the result to ``outputs.write_outputs``.

Example:
    >>> cfg, run_dir = open_run("configs/deep_relu.yaml", ["train.epochs=3"], "runs")   # doctest: +SKIP
    >>> run = train_run(cfg, run_dir, torch.device("cpu"))                              # doctest: +SKIP
    >>> run.result.test_accuracy, run.summary["verdict"]                                # doctest: +SKIP
    (0.84, ['healthy'])
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gradflow.analysis.windows import ACTIVATIONS_FILE, GRADIENTS_FILE, load_windows
from gradflow.experiments import rundir
from gradflow.experiments.config import Config, load_config, to_dict
from gradflow.experiments.recording import MonitorCallback, write_tensorboard_layout
from gradflow.experiments.train import EpochScalars, TrainResult, build_from_config, check_device, fit, trained_taps
from gradflow.monitor import GradientMonitor

if TYPE_CHECKING:  # the analysis loads when the outputs are written, after training
    from gradflow.analysis.diagnose import Diagnosis

SIGNALS = (signal.SIGINT, signal.SIGTERM)  # what asks a run to stop after its epoch


def open_run(config: str | Path, overrides: Iterable[str], logdir: str | Path, device: str = "auto") -> tuple[Config, Path]:
    """Validate everything, then create the run directory and write config.yaml (the first write).

    Raises ``ConfigError`` before anything is written."""
    cfg = load_config(config, list(overrides))
    check_device(device)
    rundir.check_logdir(logdir)
    run_dir = rundir.create_run_dir(logdir, cfg.name, cfg.train.seed)
    rundir.write_config(run_dir, to_dict(cfg))
    return cfg, run_dir


def reopen_run(run_dir: str | Path, device: str = "auto") -> tuple[Config, Path, dict[str, Any]]:
    """(config, run directory, checkpoint state) of a run to resume; its tables are cut back to
    the checkpoint. Raises ``ConfigError`` before anything is written."""
    state = rundir.load_checkpoint(run_dir)
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    check_device(device)
    windows = state.get("monitor", {}).get("windows", 0)
    for table in (GRADIENTS_FILE, ACTIVATIONS_FILE, "through_time.csv"):
        rundir.truncate_table(run_dir / table, windows)
    return cfg, run_dir, state


class StopOnSignal:
    """While active, SIGINT and SIGTERM only ask training to stop (``is_set()``, read once per
    epoch); a second signal acts as it normally would. ``signal`` says which one came."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict = {}

    def is_set(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame) -> None:
        self.signal = signal.Signals(signum)
        for sig, handler in self._previous.items():  # the next one is not caught
            signal.signal(sig, handler)

    def __enter__(self) -> StopOnSignal:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class SoloRun:
    """What ``train_run`` produced: the trainer's result, summary.json's contents, the verdict
    (None without the monitor) and the signal that stopped it (None if none did)."""

    result: TrainResult
    summary: dict[str, Any]
    diagnosis: Diagnosis | None
    stopped_by: signal.Signals | None


def train_run(cfg: Config, run_dir: Path, device: torch.device, *, progress: bool | None = None,
              resume: dict[str, Any] | None = None, callbacks: Sequence[Any] = ()) -> SoloRun:
    """Train ``cfg`` into ``run_dir`` (TensorBoard events, monitor tables, checkpoints), then write
    its outputs. SIGINT/SIGTERM stop it after the epoch, with a checkpoint to resume from.
    ``callbacks``: more trainer callbacks (``gradflow.experiments.train.Callback``), called last."""
    from torch.utils.tensorboard import SummaryWriter

    # On resume, purge_step makes TensorBoard drop events at or after the first epoch to run that
    # an earlier session wrote after its last checkpoint (a hard kill), so no step is there twice.
    purge = resume["epoch"] + 1 if resume is not None else None
    with SummaryWriter(log_dir=str(run_dir), purge_step=purge) as writer:
        with StopOnSignal() as stop:
            model, data = build_from_config(cfg)
            result, windows = fit_monitored(cfg, model.to(device), data, writer, run_dir, device,
                                            progress=progress, stop=stop, resume=resume, callbacks=callbacks)
        from gradflow.experiments.outputs import write_outputs  # matplotlib: after training, not before epoch 0

        summary, diagnosis = write_outputs(run_dir, cfg, result, windows, writer=writer, stopped_by=stop.signal)
    return SoloRun(result, summary, diagnosis, stop.signal)


def fit_monitored(cfg, model, data, writer, run_dir, device, progress=None, stop=None, resume=None, callbacks=()):
    """``fit`` with the epoch scalars and, when ``cfg.monitor.enabled``, the gradient monitor
    streaming to ``writer`` and its tables in ``run_dir``, then ``callbacks``. Returns (result,
    monitor windows).

    The monitor is attached after the model is on its device and removed however fit ends.
    Checkpoints (atomic) go to ``run_dir`` with the config and the monitor's window count;
    ``resume`` is a checkpoint to go on from (the monitor's earlier windows are read back from
    the tables: at an epoch boundary its accumulators are empty).
    """
    extra, callbacks = list(callbacks), [EpochScalars(writer)]
    earlier = load_windows(run_dir) if resume is not None and (run_dir / GRADIENTS_FILE).exists() else []

    def checkpoint(state: dict, windows: int = 0) -> None:
        writer.flush()  # events up to this epoch are on disk before the checkpoint says so
        rundir.save_checkpoint(run_dir, {**state, "config": to_dict(cfg), "monitor": {"windows": windows}})

    run = dict(device=device, progress=progress, stop=stop, resume=resume)
    if resume is not None:  # before attaching: the monitor's first weight snapshot is the checkpoint's
        model.load_state_dict(resume["model"])
    if not cfg.monitor.enabled:
        write_tensorboard_layout(writer)
        return fit(model, data, cfg.optimizer, cfg.train, callbacks=callbacks + extra, checkpoint=checkpoint, **run), []
    settings = cfg.monitor
    with GradientMonitor(model, writer, histograms=settings.histograms, weights=settings.weights,
                         activations=trained_taps(model, settings.activations),
                         activations_every=settings.activations_every,
                         histogram_every=settings.histogram_every,
                         nonfinite=True,                  # the stop message names the source (issue 24)
                         through_time_every=settings.through_time_every) as monitor:
        write_tensorboard_layout(writer, monitor.names)
        recorder = MonitorCallback(monitor, run_dir, settings.window_steps, first_window=len(earlier), writer=writer,
                                   flow_images=settings.flow_images, earlier=earlier, title=cfg.name)

        def save(state: dict) -> None:
            monitor.flush()  # histograms pooling over several windows: written up to here first
            checkpoint(state, len(earlier) + len(monitor.history))

        try:
            result = fit(model, data, cfg.optimizer, cfg.train, callbacks=callbacks + [recorder] + extra,
                         checkpoint=save, **run)
            if monitor.history:
                recorder.last_flow_image(monitor.history[-1].step)
        finally:
            recorder.close()
    if result.stopped_early:
        steps_per_epoch = -(-len(data.x_train) // cfg.train.batch_size)
        result.stop_reason = stop_reason(result.stop_reason, monitor.history, steps_per_epoch,
                                         resume["step"] if resume is not None else 0)
    return result, earlier + monitor.history


def stop_reason(reason: str, windows, steps_per_epoch: int, first_step: int = 0) -> str:
    """The trainer's stop reason with the monitor's first non-finite source put first, in the
    verdict's words (``analysis/nonfinite.py``): ``the first non-finite value came from dense_3
    (forward) at epoch 0, step 12; non-finite training loss (nan) at epoch 0``. ``first_step``:
    the global step at which the monitor attached (a resumed run)."""
    from gradflow.analysis.nonfinite import first_source, sentence

    found = first_source(windows)
    if found is None:
        return f"{reason}; no module's output or input gradient was non-finite (the loss computation made it)"
    step = first_step + found["step"]
    return f"{sentence(found, epoch=step // steps_per_epoch, step=step)}; {reason}"
