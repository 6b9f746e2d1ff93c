"""gradflow train: train a model from a YAML config into a new run directory.

Examples (from the repository root):

    gradflow train configs/deep_relu.yaml
    gradflow train configs/deep_relu.yaml model.depth=20 train.epochs=50 --seed 1
    gradflow train configs/deep_tanh.yaml model.width=[5,10,5,5,5] --logdir /tmp/runs --quiet
    python scripts/train.py configs/shallow_tanh.yaml --device cpu --threads 2
    gradflow train --resume runs/deep_relu-20250101-120000-seed0   # after Ctrl-C or a crash
    tensorboard --logdir runs

Exit status: 0 ok; 2 bad input (one line on stderr, nothing written); 3 training stopped on
a non-finite loss (outputs written up to that epoch); 130 / 143 interrupted by SIGINT (Ctrl-C) /
SIGTERM after finishing the epoch and writing a checkpoint (--resume RUN_DIR goes on).

Imports are lazy: --help loads no torch, matplotlib or tensorboard, and a command imports only
what it uses.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from gradflow.errors import ConfigError
from gradflow.startup import StartupCollector, prepare_exit

EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE = 0, 2, 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as shells report it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of stdout went away (gradflow diagnose RUN --json | head)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are the same single line as every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``gradflow`` parser. Each subcommand has a ``cmd_<name>`` handler, registered here or
    by an ``add_<name>_parser(s)`` function (sweep; diagnose and compare).

    Example:
        >>> build_parser().parse_args(["train", "configs/deep_relu.yaml"]).device
        'auto'
    """
    parser = _Parser(prog="gradflow", description="Make gradient flow visible in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser(
        "train",
        help="train a model from a YAML config",
        usage="gradflow train CONFIG [key=value ...] [--logdir DIR] [--device {auto,cpu,cuda}] "
              "[--seed N | --seeds 0-9 [--workers N]] [--quiet] [--threads N]",
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
    train.add_argument("--seeds", default=None, help="many seeds as one batched run, e.g. 0-9 or 1,4,7 (see gradflow.experiments.sweeps)")
    train.add_argument("--workers", type=int, default=None,
                       help="with --seeds: processes to split the seeds over, each training its share as one "
                            "batched model (default: the CPU count on cpu, 1 on cuda)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--threads", type=int, default=1,
                       help="CPU threads for torch (default 1: the tutorial's models gain nothing from more, "
                            "and idle threads spin against other processes on a busy machine)")
    train.set_defaults(func=cmd_train)
    add_sweep_parser(sub)
    add_analysis_parsers(sub)  # diagnose RUN_DIR [--json]; compare RUN_A RUN_B ... [--out PATH]
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    """``gradflow train``: validate everything, then create the run directory and train."""
    if args.config is not None and "=" in args.config and not Path(args.config).exists():
        args.overrides, args.config = [args.config, *args.overrides], None   # an override in CONFIG's place
        if args.resume is None:
            raise ConfigError(f"{args.overrides[0]} is a key=value override; name the CONFIG file first, "
                              f"e.g. gradflow train configs/deep_relu.yaml {' '.join(args.overrides)}")
    if args.config is None and args.resume is None:
        raise ConfigError("gradflow train needs a CONFIG file (e.g. configs/deep_relu.yaml) or --resume RUN_DIR")
    if args.config is not None and args.resume is not None:  # CONFIG is optional only for --resume
        raise ConfigError("give a CONFIG file or --resume RUN_DIR, not both; --resume goes on with RUN_DIR's config.yaml")
    if args.seeds is not None and args.resume is not None:
        raise ConfigError("--resume: resumes one run; --seeds starts new ones")
    if args.workers is not None and args.seeds is None:
        raise ConfigError("--workers: only with --seeds (one run trains in one process)")
    if args.seeds is not None:
        return cmd_train_seeds(args)
    collector = StartupCollector()  # no garbage collections until the first epoch ends (gradflow.startup)
    try:
        return _train_solo(args, collector)
    finally:
        collector.close()


def _train_solo(args: argparse.Namespace, collector: StartupCollector) -> int:
    """One run (new or ``--resume``); ``collector`` is called after each epoch."""
    from gradflow.experiments import solo
    from gradflow.experiments.train import check_device

    check_threads(args.threads)
    state = None
    if args.resume is not None:  # every check first; the run directory is the first write
        if args.overrides or args.seed is not None:
            given = " ".join([*args.overrides, *([f"--seed {args.seed}"] if args.seed is not None else [])])
            again = " ".join([*args.overrides, *([f"train.seed={args.seed}"] if args.seed is not None else [])])
            raise ConfigError(f"--resume: takes no overrides or --seed (got {given}); it goes on with the run "
                              f"directory's config.yaml; to change a setting, start a new run from that config: "
                              f"gradflow train {Path(args.resume) / 'config.yaml'} {again}")
        cfg, run_dir, state = solo.reopen_run(args.resume, args.device)
    else:
        overrides = list(args.overrides) + ([f"train.seed={args.seed}"] if args.seed is not None else [])
        cfg, run_dir = solo.open_run(args.config, overrides, args.logdir, args.device)
    device = check_device(args.device)
    import torch

    torch.set_num_threads(args.threads)  # measured: 2 threads on a loaded 2-core box ran 35x slower
    run = solo.train_run(cfg, run_dir, device, progress=False if args.quiet else None, resume=state,
                         callbacks=[collector])
    result = run.result

    print(f"Train: {result.train_accuracy:.3f}, Test: {result.test_accuracy:.3f}")
    print(f"Run directory: {run_dir}")
    if run.diagnosis is not None:
        print(run.diagnosis.line())
    if result.interrupted:
        print(f"gradflow: interrupted by {run.stopped_by.name} after epoch {result.stop_epoch}; checkpoint written, "
              f"go on with: gradflow train --resume {run_dir}", file=sys.stderr)
        return EXIT_SIGNAL[run.stopped_by]
    if result.stopped_early:
        print(f"gradflow: training stopped: {result.stop_reason} (set train.on_nonfinite=continue to go on)", file=sys.stderr)
        return EXIT_NONFINITE
    return EXIT_OK


def check_threads(threads: int) -> None:
    """``--threads``: a ConfigError unless a positive int (the monitor's check)."""
    from gradflow.monitor.model_checks import check_positive

    check_positive("--threads", threads, "torch threads per run", error=ConfigError)


def _single_seeds_number(text: str) -> str:
    """What ``--seeds N`` (one number: N seeds, or seed N?) should have been, for every N."""
    n = int(text)
    if n == 0:
        return f"--seeds {text}: 0 seeds is nothing to run; for seed 0 alone write --seed 0"
    count = "1 seed (seed 0)" if n == 1 else f"{n} seeds"
    return f"--seeds {text}: a single number is ambiguous; for {count} write --seeds 0-{n - 1}, for seed {n} alone --seed {n}"


def cmd_train_seeds(args: argparse.Namespace) -> int:
    """``gradflow train CONFIG --seeds 0-9``: the seeds as one batched run, one run directory
    per seed under a new parent directory, then the statistics over seeds."""
    from gradflow.experiments.config import load_config
    from gradflow.experiments.rundir import check_logdir
    from gradflow.experiments.sweeps.grid import parse_seeds
    from gradflow.experiments.train import check_device

    if args.seeds.strip().isdigit():   # "--seeds 3" reads as "3 seeds" as often as "seed 3"
        raise ConfigError(_single_seeds_number(args.seeds.strip()))
    seeds = parse_seeds(args.seeds)
    if args.seed is not None:
        raise ConfigError("--seed and --seeds: pass one of them (--seeds 0-9 runs seeds 0 to 9)")
    if args.resume is not None:
        raise ConfigError("--resume and --seeds: --resume goes on with one run; rerun --seeds, or use gradflow sweep (which resumes)")
    if args.config is None:
        raise ConfigError("the following arguments are required: config (gradflow train CONFIG --seeds 0-9)")
    cfg = load_config(args.config, list(args.overrides))  # validates everything before any write
    if cfg.model.type != "mlp":
        raise ConfigError(f"--seeds: trains MLPs as one batched model; model.type={cfg.model.type} is recurrent: "
                          "train its seeds one at a time (--seed N), as scripts/through_time_sweep.py does")
    device = str(check_device(args.device))
    threads = args.threads
    check_threads(threads)
    check_logdir(args.logdir)
    from gradflow.experiments.sweeps.results import seeds_report  # after the checks: these import matplotlib
    from gradflow.experiments.sweeps.seeds import train_seeds

    outcome = train_seeds(cfg, seeds, args.logdir, device=device, workers=args.workers,
                          threads=threads, progress=False if args.quiet else None)
    print(seeds_report(outcome.rows))
    print(f"Run directory: {outcome.directory}")
    if any(s["stopped_early"] for s in outcome.summaries):
        print("gradflow: training stopped on a non-finite loss in some seeds (set train.on_nonfinite=continue to go on)",
              file=sys.stderr)
        return EXIT_NONFINITE
    return EXIT_OK


SWEEP_DESCRIPTION = """Sweeps: many seeds per point over a grid of config overrides, as one table and one picture.

Commands (from the repository root):

    gradflow train configs/deep_relu.yaml --seeds 0-9          # 10 seeds, one batched run
    gradflow train configs/deep_tanh.yaml --seeds 1,4,7 train.epochs=100
    gradflow sweep configs/sweeps/relu_depth.yaml --workers 2  # resumes where it stopped
    gradflow sweep configs/sweeps/tanh_depth.yaml --backend ray --address auto

A sweep file names a base config, fixed overrides, a grid and seeds:

    name: relu_depth                 # optional; default: the file's stem
    base: ../deep_relu.yaml          # a config file (relative to the sweep file) or a mapping
    overrides: {train.epochs: 500}   # optional, applied to every run
    grid:                            # dotted config keys -> lists of values (file order)
      model.depth: [1, 5, 10, 15, 20, 25]
      model.activation: [tanh, relu]
    seeds: 0-9                       # "0-9", "1,4,7", a list of ints, or N: seed N alone

Runs whose configs differ only in the seed train as one batched model (gradflow.experiments.batched);
different shapes run in parallel processes (--workers) or on Ray. The sweep directory
holds results.csv (one row per finished run; the record that resume reads),
summary.md (median and spread per grid point), sweep.png and runs/ (one run
directory per run).
"""


def add_sweep_parser(sub: Any) -> None:
    """The ``gradflow sweep`` subcommand."""
    sweep = sub.add_parser(
        "sweep",
        help="train a grid of configs over many seeds",
        usage="gradflow sweep SWEEP.yaml [--workers N] [--backend {local,ray}] [--address ADDR] [--out DIR] "
              "[--logdir DIR] [--device {auto,cpu,cuda}]",
        description=SWEEP_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("sweep", help="sweep file, e.g. configs/sweeps/relu_depth.yaml")
    sweep.add_argument("--workers", type=int, default=None, help="parallel processes (default: the CPU count)")
    sweep.add_argument("--backend", default="local", choices=["local", "ray"], help="local processes (default) or Ray")
    sweep.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    sweep.add_argument("--logdir", default="runs", help="the sweep directory is LOGDIR/sweeps/NAME (default: runs)")
    sweep.add_argument("--out", default=None, help="the sweep directory (overrides --logdir); rerun to resume")
    sweep.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="default: cpu")
    sweep.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    """``gradflow sweep``: validate the file and options, then train what is not yet recorded."""
    from gradflow.experiments.sweeps.executors import check_workers
    from gradflow.experiments.sweeps.grid import load_sweep
    from gradflow.experiments.sweeps.results import RESULTS_FILE, summary_table
    from gradflow.experiments.sweeps.runner import run_sweep
    from gradflow.experiments.train import check_device

    if args.overrides:
        raise ConfigError(f"unrecognized arguments: {' '.join(args.overrides)}; put overrides in the sweep file's "
                          f"overrides:{_sweep_overrides_example(args.overrides)}")
    sweep = load_sweep(args.sweep)
    workers = check_workers(args.workers)
    if args.address is not None and args.backend != "ray":
        raise ConfigError("--address: only with --backend ray")
    device = str(check_device(args.device))
    out = Path(args.out) if args.out else Path(args.logdir) / "sweeps" / sweep.name
    try:
        outcome = run_sweep(sweep, out, workers=workers, backend=args.backend, address=args.address, device=device)
    except KeyboardInterrupt:
        print(f"gradflow: sweep interrupted; finished runs are in {out / RESULTS_FILE}; rerun to resume", file=sys.stderr)
        return EXIT_SIGNAL[signal.SIGINT]
    print(summary_table(sweep, outcome.rows))
    print(f"Sweep directory: {out}")
    return EXIT_OK


def _sweep_overrides_example(overrides: Sequence[str]) -> str:
    """``["train.epochs=20"]`` -> ``", e.g. overrides: {train.epochs: 20}"`` (the file's form of
    the command line's key=value overrides; empty when none looks like key=value)."""
    pairs = [o.split("=", 1) for o in overrides if "=" in o and not o.startswith("-")]
    return f", e.g. overrides: {{{', '.join(f'{k}: {v}' for k, v in pairs)}}}" if pairs else ""


def _check_gradflow_run(path: Path) -> None:
    """A folder that is no ``gradflow train`` run directory (no gradients.csv, no config.yaml: a
    Lightning or Hugging Face log folder, say) -> FileNotFoundError saying what diagnose reads and
    where such a run's verdict is. A gradflow run without gradients.csv is ``load_run``'s to explain."""
    if not path.is_dir() or (path / "gradients.csv").exists() or (path / "config.yaml").exists():
        return
    events = next(path.rglob("events.out.tfevents.*"), None) is not None
    raise FileNotFoundError(
        f"{path}: not a gradflow run directory (no gradients.csv{'; it holds TensorBoard event files' if events else ''}); "
        "gradflow diagnose reads the run directories gradflow train writes; the verdict of a Lightning or "
        "Hugging Face run with the gradflow callback is in its TensorBoard text (tag diagnosis/text_summary) "
        "and in callback.diagnosis")


def cmd_diagnose(args: argparse.Namespace) -> int:
    """``gradflow diagnose RUN_DIR [--json] [--flow PATH] [--epochs N ...]``: print the verdict.

    RUN_DIR may be the parent directory of a ``--seeds`` run: every member is diagnosed, one
    line each, then the verdict counts."""
    from gradflow.analysis.compare import load_run, plot_gradient_flow, run_directories, seeds_summary

    try:
        if args.epochs and not args.flow:   # it would be ignored: say so
            raise ValueError("--epochs: picks the epochs of the --flow chart; add --flow PATH")
        if args.flow:
            check_figure_path("--flow", args.flow)
        paths = run_directories([args.run_dir])
        if len(paths) > 1 and args.flow:
            raise ValueError(f"--flow: draws one run; {args.run_dir} holds {len(paths)} (pick one of them)")
        for path in paths:
            _check_gradflow_run(Path(path))
        runs = [load_run(path) for path in paths]
        if args.flow:
            plot_gradient_flow(runs[0].windows, args.flow, args.epochs, title=runs[0].name)
    except (OSError, ValueError) as exc:  # a missing run, an unwritable figure
        return _bad_input(exc)
    parent = Path(paths[0]).resolve() != Path(args.run_dir).resolve()   # a --seeds parent, even of one member
    if parent:
        if args.json:
            print(json.dumps({"parent": str(args.run_dir), "runs": [{"run_dir": str(r.path), **r.diagnosis.to_dict()}
                                                                      for r in runs]}, indent=2))
        else:
            print(seeds_summary(runs))
        return EXIT_OK
    run = runs[0]
    if args.json:
        print(json.dumps({"run_dir": str(run.path), **run.diagnosis.to_dict()}, indent=2))
    else:
        print(run.diagnosis.report())
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    """``gradflow compare RUN_A RUN_B ... [--out PATH] [--flow]``: table and figure. A ``--seeds``
    parent directory stands for its members."""
    from gradflow.analysis.compare import compare_table, load_run, plot_compare, plot_gradient_flow, run_directories

    try:
        check_figure_path("--out", args.out)
        paths = run_directories(args.run_dirs)
        if len(paths) < 2:
            raise ValueError(f"compare needs two or more runs, got one ({paths[0]}); "
                             f"gradflow diagnose {paths[0]} --flow flow.png shows one run")
        runs = [load_run(path) for path in paths]
    except (OSError, ValueError) as exc:  # a missing run, an unwritable figure
        return _bad_input(exc)
    print(compare_table(runs))
    out = Path(args.out)
    plot_compare(runs, out)
    print(f"Figure: {out.resolve()}")
    if any(getattr(w, "time", None) for run in runs for w in run.windows):   # recurrent runs (issue 22)
        from gradflow.analysis.time_plots import plot_compare_through_time

        through = plot_compare_through_time(runs, out.with_name(f"{out.stem}-through_time.png"))
        print(f"Gradient through time: {through.resolve()}")
    if args.flow:
        for run in runs:
            flow = out.with_name(f"{out.stem}-flow-{run.name}.png")
            plot_gradient_flow(run.windows, flow, title=run.name)
            print(f"Gradient flow: {flow.resolve()}")
    return EXIT_OK


def check_figure_path(option: str, path: str) -> None:
    """ValueError naming ``option`` unless ``path`` can take a figure: not a directory, in a
    directory that exists, with a suffix matplotlib writes (``.png``, ``.pdf``, ``.svg``, ...).

    Example:
        >>> check_figure_path("--flow", "flow.png")
        >>> check_figure_path("--flow", ".")
        Traceback (most recent call last):
        ValueError: --flow .: is a directory; give a figure file such as flow.png
    """
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option} {path}: is a directory; give a figure file such as {target / 'flow.png'}")
    if not target.parent.is_dir():
        raise ValueError(f"{option} {path}: directory {target.parent} does not exist")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if target.suffix.lstrip(".").lower() not in formats:
        raise ValueError(f"{option} {path}: the name must end in a figure format: .{', .'.join(formats)}")


# What `gradflow diagnose --help` and `gradflow compare --help` open with, as `train --help` does.
DIAGNOSE_DESCRIPTION = """\
gradflow diagnose: the verdict of a run directory that gradflow train wrote (healthy, vanishing,
exploding, saturated, dead-units, stalled, ...), the per-layer evidence, each check and advice.

Examples (from the repository root):

    gradflow diagnose runs/deep_tanh-20250101-120000-seed0
    gradflow diagnose runs/deep_tanh-20250101-120000-seed0 --flow flow.png --epochs 0 10 499
    gradflow diagnose runs/deep_relu-20250101-120000-seeds0-9     # a --seeds run: one line per seed
    gradflow diagnose runs/deep_relu-20250101-120000-seed0 --json | python -m json.tool

Your own loop's verdict is gradflow.analysis.diagnose.diagnose_monitor(monitor, losses); a Lightning
or Hugging Face callback's is callback.diagnosis. Exit status: 0 ok; 2 bad input (one line on stderr).
"""

COMPARE_DESCRIPTION = """\
gradflow compare: two or more runs side by side: a table (verdict, accuracy, gradient size of the
first hidden layer and the head, weakest layer) and a figure (gradient flow against depth, each
layer per epoch, accuracy).

Examples (from the repository root):

    gradflow compare runs/deep_tanh-20250101-120000-seed0 runs/deep_relu-20250101-120000-seed0
    gradflow compare runs/deep_tanh-* runs/deep_relu-* --out tanh_vs_relu.png --flow

Exit status: 0 ok; 2 bad input (one line on stderr).
"""


def add_analysis_parsers(subparsers: Any) -> None:
    """Register ``diagnose`` and ``compare`` on the ``gradflow`` parser's subparsers.

    Example:
        >>> parser = argparse.ArgumentParser(prog="gradflow")
        >>> add_analysis_parsers(parser.add_subparsers(dest="command"))
        >>> parser.parse_args(["diagnose", "runs/x", "--json"]).json
        True
    """
    diagnose_parser = subparsers.add_parser(
        "diagnose", help="say whether a run's gradients vanish, explode or die, and why",
        usage="gradflow diagnose RUN_DIR [--json] [--flow PATH [--epochs N ...]]",
        description=DIAGNOSE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    diagnose_parser.add_argument("run_dir", metavar="RUN_DIR",
                                 help="a run directory with gradients.csv, or the parent directory of a --seeds run")
    diagnose_parser.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
    diagnose_parser.add_argument("--flow", metavar="PATH", help="also draw the gradient-flow bar chart here")
    diagnose_parser.add_argument("--epochs", type=int, nargs="+", metavar="N",
                                 help="epochs for the bar chart (default: first, middle, last)")
    diagnose_parser.set_defaults(func=cmd_diagnose)
    compare_parser = subparsers.add_parser(
        "compare", help="compare runs: gradient size per layer and accuracy side by side",
        usage="gradflow compare RUN_A RUN_B ... [--out PATH] [--flow]",
        description=COMPARE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare_parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                                help="two or more run directories with gradients.csv (a --seeds parent directory "
                                     "counts as its members)")
    compare_parser.add_argument("--out", default="compare.png", help="figure path (default: compare.png)")
    compare_parser.add_argument("--flow", action="store_true",
                                help="also draw each run's gradient-flow bar chart next to the figure")
    compare_parser.set_defaults(func=cmd_compare)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradflow`` console script; returns the exit status. Without ``argv``
    (the console script, ``python -m gradflow.cli``) the process ends next: ``prepare_exit``.

    Example:
        >>> main(["train", "missing.yaml"])  # doctest: +SKIP
        2
    """
    status = _run(argv)
    if argv is None:
        prepare_exit()
    return status


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else list(argv)):   # bare `gradflow`: what it can do
        parser.print_help()
        return EXIT_OK
    try:
        args, extra = parser.parse_known_args(argv)
        unknown = [a for a in extra if a.startswith("-") or "=" not in a]
        if unknown:
            raise ConfigError(f"unrecognized arguments: {' '.join(unknown)}; {_override_hint(extra)}")
        args.overrides = extra
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return status
    except ConfigError as exc:
        return _bad_input(exc)
    except BrokenPipeError:
        return _closed_pipe()


def _bad_input(exc: Exception) -> int:
    """The one error path for bad input (a ConfigError from any command, a missing run or an
    unwritable figure in diagnose/compare): ``gradflow: error: <message>`` as exactly one line on
    stderr, and exit status ``EXIT_BAD_INPUT``."""
    message = " ".join(str(exc).split())  # exactly one line
    print(f"gradflow: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _override_hint(extra: Sequence[str]) -> str:
    """What to write instead of options that look like config keys: ``--epochs 5`` ->
    ``train.epochs=5`` (the nearest accepted key, gradflow.experiments.config.suggest_key)."""
    from gradflow.experiments.config import suggest_key

    fixes = []
    for i, arg in enumerate(extra):
        if not arg.startswith("--") or len(arg) < 3:
            continue
        name, sep, value = arg[2:].partition("=")
        if not sep and i + 1 < len(extra) and not extra[i + 1].startswith("-") and "=" not in extra[i + 1]:
            value = extra[i + 1]
        key = suggest_key(name.replace("-", "_")) if name.replace("-", "_").replace(".", "").isidentifier() else None
        if key:
            fixes.append(f"{key}={value or '...'}")
    if fixes:
        return f"config settings are key=value overrides: {' '.join(fixes)}"
    return "overrides look like key=value"


def _closed_pipe() -> int:
    """stdout's reader went away (``| head``): stop quietly, as Unix tools do. Python would
    otherwise print a second BrokenPipeError when it flushes stdout at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
