"""How long gradflow takes to start: ``--help``, the torch floors, and a training run's first epoch.

Every figure is a fresh process, timed from just before it is started (``subprocess.Popen``)
by this script, which runs the commands in turn, round after round, and prints medians side by
side with the spread (min-max) and the load average before and after.

    gradflow --help                     ``python -m gradflow.cli --help`` until the process exits
    import torch                        ``python -c "import torch"``: the floor of anything that trains
    import torch, torch._dynamo         the floor of a run with a torch.optim optimizer, which imports
                                        torch._dynamo when it is made (torch's own lazy import)
    train: first epoch                  ``gradflow train configs/deep_relu.yaml train.epochs=1 --quiet``
                                        until the first window's rows of gradients.csv are on disk: the
                                        end of epoch 0, after its validation pass, its TensorBoard
                                        scalars and the monitor's window (written and flushed then)
    train: whole 1-epoch run            the same process until it exits (outputs, plots, verdict)

The console script runs ``gradflow.cli.main`` as ``python -m gradflow.cli`` does; this script runs
the copy of gradflow it sits in (the repository root is on PYTHONPATH), whatever is installed.
``--baseline DIR`` times another checkout's gradflow in the same rounds, e.g. a worktree of main
(``git worktree add /tmp/gradflow-main main``), and prints its rows beside these.

Examples (from the repository root):

    python benchmarks/startup.py                 # 7 rounds
    python benchmarks/startup.py --rounds 11 --config configs/deep_tanh.yaml
    python benchmarks/startup.py --baseline /tmp/gradflow-main
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.005


def env(root: Path) -> dict[str, str]:
    """The checkout at ``root`` first on the path, as scripts/train.py puts it."""
    paths = [str(root)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def time_exit(argv: list[str], root: Path = ROOT) -> float:
    """Seconds from start to exit of ``argv`` (output discarded; a failure is an error)."""
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=root, env=env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def first_window_on_disk(logdir: Path) -> bool:
    """True once a run directory under ``logdir`` has a data row in gradients.csv."""
    for table in logdir.glob("*/gradients.csv"):
        with open(table) as f:
            if sum(1 for _ in f) >= 2:   # header, then the first window's rows
                return True
    return False


def time_train(config: str, root: Path = ROOT) -> tuple[float, float]:
    """(seconds to the first epoch's window on disk, seconds to exit) of a 1-epoch run."""
    with tempfile.TemporaryDirectory() as logdir:
        argv = [sys.executable, "-m", "gradflow.cli", "train", config, "train.epochs=1", "--logdir", logdir, "--quiet"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=root, env=env(root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        first = None
        while proc.poll() is None:
            if first is None and first_window_on_disk(Path(logdir)):
                first = time.perf_counter() - t0
            time.sleep(POLL_S)
        total = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"train failed ({proc.returncode}): {proc.stderr.read().decode()}")
        if first is None:  # it finished between two polls
            first = total if first_window_on_disk(Path(logdir)) else float("nan")
        return first, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--config", default="configs/deep_relu.yaml")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to time in the same rounds")
    args = parser.parse_args()
    py = sys.executable
    roots = {"": ROOT, **({"baseline ": args.baseline.resolve()} if args.baseline else {})}
    figures: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    load_before = os.getloadavg()
    for _ in range(args.rounds):
        add("import torch", time_exit([py, "-c", "import torch"]))
        add("import torch, torch._dynamo", time_exit([py, "-c", "import torch, torch._dynamo"]))
        for label, root in roots.items():
            add(f"{label}gradflow --help", time_exit([py, "-m", "gradflow.cli", "--help"], root))
            first, total = time_train(args.config, root)
            add(f"{label}train: first epoch", first)
            add(f"{label}train: whole 1-epoch run", total)
    load_after = os.getloadavg()
    torch_median = statistics.median(figures["import torch"])
    print(f"{args.rounds} rounds, {args.config}; load average (1, 5, 15 min) before "
          f"{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in load_after)}; "
          f"{os.cpu_count()} CPUs")
    print(f"{'':30s} {'median s':>9s} {'min-max s':>12s} {'x import torch':>15s}")
    for name, values in figures.items():
        median = statistics.median(values)
        print(f"{name:30s} {median:9.2f} {min(values):5.2f}-{max(values):<6.2f} {median / torch_median:15.2f}")


if __name__ == "__main__":
    main()
