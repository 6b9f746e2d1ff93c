"""How long gradflow takes to start: ``--help``, the torch floors, and a training run's first epoch.

Every figure is a fresh process, timed from just before it is started (``subprocess.Popen``)
by this script, which runs the commands in turn, round after round, and prints medians side by
side with the spread (min-max) and the load average before and after. Beside each wall-clock
median it prints the median CPU time of the process (user + system; Linux), which other jobs on
a shared machine disturb far less than the wall clock.

    gradflow --help                     ``python -m gradflow.cli --help`` until the process exits
    import torch                        ``python -c "import torch"`` until the import is done (it then
                                        ends with ``os._exit``, skipping the interpreter's teardown,
                                        which after torch costs 0.5-1 s of its own): the floor of
                                        anything that trains
    import torch, torch._dynamo         the same for the floor of a run with a torch.optim optimizer,
                                        which imports torch._dynamo when it is made (torch's own lazy
                                        import)
    train: first epoch                  ``gradflow train configs/deep_relu.yaml train.epochs=1 --quiet``
                                        until the first window's rows of gradients.csv are on disk: the
                                        end of epoch 0, after its validation pass, its TensorBoard
                                        scalars and the monitor's window (written and flushed then);
                                        polled every 5 ms
    train: whole 1-epoch run            the same process until it exits (outputs, plots, verdict)

The runs read the data set from gradflow's cache (``gradflow.experiments.data``), as every run
after the first on a machine does; the first round fills it if it is empty.

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
import math
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process so far (nan where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime, stime


def first_window_on_disk(logdir: Path) -> bool:
    """True once a run directory under ``logdir`` has a data row in gradients.csv."""
    for table in logdir.glob("*/gradients.csv"):
        with open(table) as f:
            if sum(1 for _ in f) >= 2:   # header, then the first window's rows
                return True
    return False


def timed(argv: list[str], root: Path = ROOT, logdir: Path | None = None) -> dict[str, float]:
    """Wall and CPU seconds of ``argv`` to its exit and, with ``logdir``, to its first window."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=root, env=env(root), stdout=subprocess.DEVNULL, stderr=err)
        out: dict[str, float] = {}
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if logdir is not None and "first" not in out and first_window_on_disk(logdir):
                out["first"], out["first_cpu"] = time.perf_counter() - t0, cpu_seconds(proc.pid)
            time.sleep(POLL_S)
        out["exit"], out["exit_cpu"] = time.perf_counter() - t0, usage.ru_utime + usage.ru_stime
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {err.read().decode()}")
    if logdir is not None and "first" not in out:  # it finished between two polls
        out["first"], out["first_cpu"] = out["exit"], out["exit_cpu"]
    return out


def time_train(config: str, root: Path = ROOT) -> dict[str, float]:
    """``timed`` for a 1-epoch run of ``config`` into a fresh log directory."""
    with tempfile.TemporaryDirectory() as logdir:
        argv = [sys.executable, "-m", "gradflow.cli", "train", config, "train.epochs=1", "--logdir", logdir, "--quiet"]
        return timed(argv, root, Path(logdir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--config", default="configs/deep_relu.yaml")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to time in the same rounds")
    args = parser.parse_args()
    py = sys.executable
    roots = {"": ROOT, **({"baseline ": args.baseline.resolve()} if args.baseline else {})}
    figures: dict[str, list[tuple[float, float]]] = {}

    def add(name: str, wall: float, cpu: float) -> None:
        figures.setdefault(name, []).append((wall, cpu))

    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name in ("import torch", "import torch, torch._dynamo"):
            t = timed([py, "-c", f"{name}; import os; os._exit(0)"])
            add(name, t["exit"], t["exit_cpu"])
        for label, root in roots.items():
            t = timed([py, "-m", "gradflow.cli", "--help"], root)
            add(f"{label}gradflow --help", t["exit"], t["exit_cpu"])
            t = time_train(args.config, root)
            add(f"{label}train: first epoch", t["first"], t["first_cpu"])
            add(f"{label}train: whole 1-epoch run", t["exit"], t["exit_cpu"])
    load_after = os.getloadavg()
    torch_wall = statistics.median(w for w, _ in figures["import torch"])
    print(f"{args.rounds} rounds, {args.config}; load average (1, 5, 15 min) before "
          f"{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in load_after)}; "
          f"{os.cpu_count()} CPUs")
    print(f"{'':34s} {'wall s':>7s} {'min-max':>11s} {'x torch':>8s} {'CPU s':>7s} {'min-max':>11s}")
    for name, values in figures.items():
        wall, cpu = [w for w, _ in values], [c for _, c in values]
        print(f"{name:34s} {statistics.median(wall):7.2f} {min(wall):5.2f}-{max(wall):<5.2f} "
              f"{statistics.median(wall) / torch_wall:8.2f} {statistics.median(cpu):7.2f} {min(cpu):5.2f}-{max(cpu):<5.2f}")


if __name__ == "__main__":
    main()
