"""gradflow command line.

Examples (from the repository root):

    gradflow train configs/deep_relu.yaml
    gradflow train configs/deep_relu.yaml model.depth=20 train.epochs=50 --seed 1
    gradflow train configs/deep_tanh.yaml model.width=[5,10,5,5,5] --logdir /tmp/runs --quiet
    python scripts/train.py configs/shallow_tanh.yaml --device cpu --threads 2
    gradflow train --resume runs/deep_relu-20250101-120000-seed0   # after Ctrl-C or a crash
    tensorboard --logdir runs

Exit status: 0 ok; 2 bad input (one line on stderr, nothing written); 3 training stopped on
a non-finite loss (outputs written up to that epoch); 130 / 143 interrupted by SIGINT (Ctrl-C) /
SIGTERM after finishing the epoch and writing a checkpoint (``--resume RUN_DIR`` goes on).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import NoReturn, Optional, Sequence

import torch

from gradflow.errors import ConfigError

EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE = 0, 2, 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as shells report it


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are the same single line as every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``gradflow`` parser; add a subcommand with another ``sub.add_parser`` block.

    Example:
        >>> build_parser().parse_args(["train", "configs/deep_relu.yaml"]).device
        'auto'
    """
    parser = _Parser(prog="gradflow", description="Make gradient flow visible in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser(
        "train",
        help="train a model from a YAML config",
        usage="gradflow train CONFIG [key=value ...] [--logdir DIR] [--device {auto,cpu,cuda}] [--seed N | --seeds 0-9 [--workers N]] [--quiet] [--threads N]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # key=value overrides are the leftovers of parse_known_args (see main): they may follow options.
    train.add_argument("config", nargs="?", help="YAML config, e.g. configs/deep_relu.yaml; then key=value overrides")
    train.add_argument("--resume", metavar="RUN_DIR", default=None,
                       help="go on from RUN_DIR's checkpoint (its config.yaml; no CONFIG or overrides)")
    train.add_argument("--logdir", default="runs", help="parent of the run directory (default: runs)")
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto (cuda if available)")
    train.add_argument("--seed", type=int, default=None, help="sets train.seed")
    train.add_argument("--seeds", default=None, help="many seeds as one batched run, e.g. 0-9 or 1,4,7 (see gradflow.sweep)")
    train.add_argument("--workers", type=int, default=None,
                       help="with --seeds: processes to split the seeds over, each training its share as one "
                            "batched model (default: the CPU count on cpu, 1 on cuda)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--threads", type=int, default=1,
                       help="CPU threads for torch (default 1: the tutorial's models gain nothing from more, "
                            "and idle threads spin against other processes on a busy machine)")
    train.set_defaults(func=cmd_train)
    from gradflow.sweep import add_sweep_parser

    add_sweep_parser(sub, _Parser)
    from gradflow.compare import add_commands

    add_commands(sub)  # diagnose RUN_DIR [--json]; compare RUN_A RUN_B ... [--out PATH]
    return parser


def check_device(device: str) -> torch.device:
    """Resolve ``auto``; a CUDA request on a machine without CUDA is a ``ConfigError``.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda requested but torch.cuda.is_available() is False; accepted here: auto, cpu")
    from gradflow.train import resolve_device

    return resolve_device(device)


def cmd_train(args: argparse.Namespace) -> int:
    """``gradflow train``: validate everything, then create the run directory and train."""
    if (args.config is None) == (args.resume is None):  # CONFIG is optional only for --resume
        raise ConfigError("give a CONFIG file or --resume RUN_DIR (not both)")
    if args.seeds is not None and args.resume is not None:
        raise ConfigError("--resume: resumes one run; --seeds starts new ones")
    if args.workers is not None and args.seeds is None:
        raise ConfigError("--workers: only with --seeds (one run trains in one process)")
    if args.seeds is not None:
        from gradflow.sweep import cmd_train_seeds

        return cmd_train_seeds(args)
    from gradflow import rundir

    cfg, run_dir, state = _open_run(args)  # every check first; the run directory is the first write
    device = check_device(args.device)

    from torch.utils.tensorboard import SummaryWriter

    from gradflow.plots import plot_accuracy, plot_gradients
    from gradflow.train import build_from_config

    torch.set_num_threads(args.threads)  # measured: 2 threads on a loaded 2-core box ran 35x slower
    # On resume, purge_step makes TensorBoard drop events at or after the first epoch to run that
    # an earlier session wrote after its last checkpoint (a hard kill), so no step is there twice.
    purge = state["epoch"] + 1 if state is not None else None
    with SummaryWriter(log_dir=str(run_dir), purge_step=purge) as writer, StopOnSignal() as stop:
        model, data = build_from_config(cfg)
        result, windows = fit_monitored(cfg, model.to(device), data, writer, run_dir, device,
                                        progress=False if args.quiet else None, stop=stop, resume=state)
        diagnosis = _diagnose(result, windows, writer)
    rundir.write_history(run_dir, result.history)
    rundir.write_summary(run_dir, _summary(cfg, result, windows, stop.signal, diagnosis))
    plot_accuracy(result.history, run_dir / "accuracy.png", title=cfg.name)
    if windows:
        plot_gradients(windows, run_dir / "gradients.png", title=cfg.name)

    print(f"Train: {result.train_accuracy:.3f}, Test: {result.test_accuracy:.3f}")
    print(f"Run directory: {run_dir}")
    if diagnosis is not None:
        print(diagnosis.line())
    if result.interrupted:
        print(f"gradflow: interrupted by {stop.signal.name} after epoch {result.stop_epoch}; checkpoint written, "
              f"go on with: gradflow train --resume {run_dir}", file=sys.stderr)
        return EXIT_SIGNAL[stop.signal]
    if result.stopped_early:
        print(f"gradflow: training stopped: {result.stop_reason} (set train.on_nonfinite=continue to go on)", file=sys.stderr)
        return EXIT_NONFINITE
    return EXIT_OK


def _open_run(args: argparse.Namespace):
    """(config, run directory, checkpoint state or None): a new run, or the one ``--resume`` names.

    Raises ``ConfigError`` before anything is written; a resumed run's tables are cut back to
    its checkpoint."""
    from gradflow import rundir
    from gradflow.config import load_config, to_dict

    if args.threads < 1:
        raise ConfigError(f"--threads: must be >= 1, got {args.threads}")
    if args.resume is not None:
        if args.overrides or args.seed is not None:
            raise ConfigError("--resume: takes no overrides or --seed; the run directory's config.yaml is used")
        state = rundir.load_checkpoint(args.resume)
        run_dir = Path(args.resume)
        cfg = load_config(run_dir / "config.yaml")
        check_device(args.device)
        windows = state.get("monitor", {}).get("windows", 0)
        for table in ("gradients.csv", "activations.csv"):
            rundir.truncate_table(run_dir / table, windows)
        return cfg, run_dir, state
    overrides = list(args.overrides) + ([f"train.seed={args.seed}"] if args.seed is not None else [])
    cfg = load_config(args.config, overrides)
    check_device(args.device)
    rundir.check_logdir(args.logdir)
    run_dir = rundir.create_run_dir(args.logdir, cfg.name, cfg.train.seed)  # the first write
    rundir.write_config(run_dir, to_dict(cfg))
    return cfg, run_dir, None


class StopOnSignal:
    """While active, SIGINT and SIGTERM only ask training to stop (``is_set()``, read once per
    epoch); a second signal acts as it normally would. ``signal`` says which one came."""

    def __init__(self) -> None:
        self.signal: Optional[signal.Signals] = None
        self._previous: dict = {}

    def is_set(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame) -> None:
        self.signal = signal.Signals(signum)
        for sig, handler in self._previous.items():  # the next one is not caught
            signal.signal(sig, handler)

    def __enter__(self) -> "StopOnSignal":
        self._previous = {sig: signal.signal(sig, self._handle) for sig in EXIT_SIGNAL}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def fit_monitored(cfg, model, data, writer, run_dir, device, progress=None, stop=None, resume=None):
    """``fit`` with the epoch scalars and, when ``cfg.monitor.enabled``, the gradient monitor
    streaming to ``writer`` and its tables in ``run_dir``. Returns (result, monitor windows).

    The monitor is attached after the model is on its device and removed however fit ends.
    Checkpoints (atomic) go to ``run_dir`` with the config and the monitor's window count;
    ``resume`` is a checkpoint to go on from (the monitor's earlier windows are read back from
    the tables: at an epoch boundary its accumulators are empty).
    """
    from gradflow import GradientMonitor, rundir
    from gradflow.config import to_dict
    from gradflow.recording import MonitorCallback, load_windows
    from gradflow.train import EpochScalars, fit

    callbacks: list = [EpochScalars(writer)]
    earlier = load_windows(run_dir) if resume is not None and (run_dir / "gradients.csv").exists() else []

    def checkpoint(state: dict, windows: int = 0) -> None:
        writer.flush()  # events up to this epoch are on disk before the checkpoint says so
        rundir.save_checkpoint(run_dir, {**state, "config": to_dict(cfg), "monitor": {"windows": windows}})

    run = dict(device=device, progress=progress, stop=stop, resume=resume)
    if resume is not None:  # before attaching: the monitor's first weight snapshot is the checkpoint's
        model.load_state_dict(resume["model"])
    if not cfg.monitor.enabled:
        return fit(model, data, cfg.optimizer, cfg.train, callbacks=callbacks, checkpoint=checkpoint, **run), []
    settings = cfg.monitor
    with GradientMonitor(model, writer, histograms=settings.histograms, weights=settings.weights,
                         activations=settings.activations) as monitor:
        recorder = MonitorCallback(monitor, run_dir, settings.window_steps, first_window=len(earlier))
        try:
            result = fit(model, data, cfg.optimizer, cfg.train, callbacks=callbacks + [recorder],
                         checkpoint=lambda state: checkpoint(state, len(earlier) + len(monitor.history)), **run)
        finally:
            recorder.close()
    return result, earlier + monitor.history


def _diagnose(result, windows, writer):
    """The run's verdict (None without monitor windows), also written to TensorBoard."""
    if not windows:
        return None
    from gradflow.diagnose import diagnose, write_to_tensorboard

    diagnosis = diagnose(windows, [row["loss"] for row in result.history])
    write_to_tensorboard(diagnosis, writer, result.history[-1]["epoch"] if result.history else 0)
    return diagnosis


def _summary(cfg, result, windows=(), stopped_by: Optional[signal.Signals] = None, diagnosis=None) -> dict:
    nonfinite = [(i, sum(row.get("nonfinite", 0) for row in w.gradients.values())) for i, w in enumerate(windows)]
    return {
        "name": cfg.name,
        "train_accuracy": result.train_accuracy,
        "test_accuracy": result.test_accuracy,
        "epochs": result.epochs_run,
        "seconds": round(result.seconds, 3),
        "seed": cfg.train.seed,
        "device": result.device,
        "stopped_early": result.stopped_early,
        "stop_epoch": result.stop_epoch,
        "stop_reason": result.stop_reason,
        "interrupted": stopped_by.name if result.interrupted else None,
        # The monitor's count of NaN/inf gradient elements, in all and per window.
        "nonfinite_gradients": sum(count for _, count in nonfinite),
        "first_nonfinite_window": next((i for i, count in nonfinite if count), None),
        "verdict": diagnosis.verdicts if diagnosis is not None else None,
        "verdict_line": diagnosis.line() if diagnosis is not None else None,
        "recommendation": diagnosis.recommendation if diagnosis is not None else None,
        "torch_version": torch.__version__,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``gradflow`` console script; returns the exit status.

    Example:
        >>> main(["train", "missing.yaml"])  # doctest: +SKIP
        2
    """
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        unknown = [a for a in extra if a.startswith("-") or "=" not in a]
        if unknown:
            raise ConfigError(f"unrecognized arguments: {' '.join(unknown)}; overrides look like key=value")
        args.overrides = extra
        return args.func(args)
    except ConfigError as exc:
        message = " ".join(str(exc).split())  # exactly one line
        print(f"gradflow: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
