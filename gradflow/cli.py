"""gradflow command line.

Examples (from the repository root):

    gradflow train configs/deep_relu.yaml
    gradflow train configs/deep_relu.yaml model.depth=20 train.epochs=50 --seed 1
    gradflow train configs/deep_tanh.yaml model.width=[5,10,5,5,5] --logdir /tmp/runs --quiet
    python scripts/train.py configs/shallow_tanh.yaml --device cpu --threads 2
    tensorboard --logdir runs

Exit status: 0 ok; 2 bad input (one line on stderr, nothing written); 3 training stopped on
a non-finite loss (outputs written up to that epoch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn, Optional, Sequence

import torch

from gradflow.errors import ConfigError

EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE = 0, 2, 3


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
        usage="gradflow train CONFIG [key=value ...] [--logdir DIR] [--device {auto,cpu,cuda}] [--seed N | --seeds 0-9] [--quiet] [--threads N]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # key=value overrides are the leftovers of parse_known_args (see main): they may follow options.
    train.add_argument("config", help="YAML config, e.g. configs/deep_relu.yaml; then key=value overrides")
    train.add_argument("--logdir", default="runs", help="parent of the run directory (default: runs)")
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto (cuda if available)")
    train.add_argument("--seed", type=int, default=None, help="sets train.seed")
    train.add_argument("--seeds", default=None, help="many seeds as one batched run, e.g. 0-9 or 1,4,7 (see gradflow.sweep)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--threads", type=int, default=1,
                       help="CPU threads for torch (default 1: the tutorial's models gain nothing from more, "
                            "and idle threads spin against other processes on a busy machine)")
    train.set_defaults(func=cmd_train)
    from gradflow.sweep import add_sweep_parser

    add_sweep_parser(sub, _Parser)
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
    if args.seeds is not None:
        from gradflow.sweep import cmd_train_seeds

        return cmd_train_seeds(args)
    from gradflow import rundir
    from gradflow.config import load_config, to_dict

    overrides = list(args.overrides) + ([f"train.seed={args.seed}"] if args.seed is not None else [])
    cfg = load_config(args.config, overrides)
    device = check_device(args.device)
    if args.threads < 1:
        raise ConfigError(f"--threads: must be >= 1, got {args.threads}")
    rundir.check_logdir(args.logdir)
    run_dir = rundir.create_run_dir(args.logdir, cfg.name, cfg.train.seed)  # the first write

    from torch.utils.tensorboard import SummaryWriter

    from gradflow.plots import plot_accuracy, plot_gradients
    from gradflow.train import build_from_config

    torch.set_num_threads(args.threads)  # measured: 2 threads on a loaded 2-core box ran 35x slower
    rundir.write_config(run_dir, to_dict(cfg))
    with SummaryWriter(log_dir=str(run_dir)) as writer:
        model, data = build_from_config(cfg)
        result, windows = fit_monitored(cfg, model.to(device), data, writer, run_dir, device,
                                        progress=False if args.quiet else None)
    rundir.write_history(run_dir, result.history)
    rundir.write_summary(run_dir, _summary(cfg, result))
    plot_accuracy(result.history, run_dir / "accuracy.png", title=cfg.name)
    if windows:
        plot_gradients(windows, run_dir / "gradients.png", title=cfg.name)

    print(f"Train: {result.train_accuracy:.3f}, Test: {result.test_accuracy:.3f}")
    print(f"Run directory: {run_dir}")
    if result.stopped_early:
        print(f"gradflow: training stopped: {result.stop_reason} (set train.on_nonfinite=continue to go on)", file=sys.stderr)
        return EXIT_NONFINITE
    return EXIT_OK


def fit_monitored(cfg, model, data, writer, run_dir, device, progress=None):
    """``fit`` with the epoch scalars and, when ``cfg.monitor.enabled``, the gradient monitor
    streaming to ``writer`` and its tables in ``run_dir``. Returns (result, monitor windows).

    The monitor is attached after the model is on its device and removed however fit ends.
    """
    from gradflow import GradientMonitor
    from gradflow.recording import MonitorCallback
    from gradflow.train import EpochScalars, fit

    callbacks: list = [EpochScalars(writer)]
    if not cfg.monitor.enabled:
        return fit(model, data, cfg.optimizer, cfg.train, device=device, callbacks=callbacks, progress=progress), []
    settings = cfg.monitor
    with GradientMonitor(model, writer, histograms=settings.histograms, weights=settings.weights,
                         activations=settings.activations) as monitor:
        recorder = MonitorCallback(monitor, run_dir, settings.window_steps)
        try:
            result = fit(model, data, cfg.optimizer, cfg.train, device=device,
                         callbacks=callbacks + [recorder], progress=progress)
        finally:
            recorder.close()
    return result, monitor.history


def _summary(cfg, result) -> dict:
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
