"""How much do many seeds cost? One solo seed against K seeds as one batched model, measured
side by side in one run, and the tutorial's three configs x K seeds against the Keras original.

Runs (from the repository root):

    python benchmarks/seeds_speed.py                      # 500 epochs, 10 seeds, 2 workers
    python benchmarks/seeds_speed.py --epochs 100 --seeds 5 --repeats 1
    python benchmarks/seeds_speed.py --clock cpu          # CPU seconds: steadier on a shared machine

Prints, for deep_relu:
- the training loop alone: ``train.fit`` of one seed vs ``batched.fit_batched`` of K seeds;
- complete runs with the monitor and every file of the run directory: one seed (fit with a
  GradientMonitor, MonitorCallback and SummaryWriter, files, plot and verdict, as a CLI run
  records) vs ``batched.train_members`` of K seeds (K run directories) in one process, and vs
  the K seeds split over ``--workers`` processes as ``gradflow train --seeds`` runs them, with
  TensorBoard histograms on (the config default) and off (the sweep files' setting);
and the wall time of shallow_tanh, deep_tanh and deep_relu x K seeds through the sweep's
process pool (complete runs) against the Keras original's ~80 s for ONE run on these machines.
Every model uses one thread per process (torch.set_num_threads(1)).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradflow import GradientMonitor  # noqa: E402
from gradflow.analysis.windows import load_windows  # noqa: E402
from gradflow.experiments.batched import build_batched, fit_batched, train_members  # noqa: E402
from gradflow.experiments.config import load_config, to_dict  # noqa: E402
from gradflow.experiments.data import load_dataset  # noqa: E402
from gradflow.experiments.models import build_model  # noqa: E402
from gradflow.experiments.outputs import write_outputs  # noqa: E402
from gradflow.experiments.recording import MonitorCallback  # noqa: E402
from gradflow.experiments.rundir import write_config  # noqa: E402
from gradflow.experiments.sweeps.executors import LocalExecutor  # noqa: E402
from gradflow.experiments.sweeps.seeds import train_seeds_in_workers  # noqa: E402
from gradflow.experiments.train import EpochScalars, fit  # noqa: E402


def wall() -> float:
    return time.perf_counter()


def cpu() -> float:
    """CPU seconds of this process and its finished children (the worker processes)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


clock = wall                     # --clock cpu: cpu

KERAS_SECONDS = 80.0  # one 500-epoch run of the Keras original on these machines
CONFIGS = ("configs/shallow_tanh.yaml", "configs/deep_tanh.yaml", "configs/deep_relu.yaml")


def solo_loop(cfg, data) -> float:
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    t0 = clock()
    fit(model, data, cfg.optimizer, cfg.train)
    return clock() - t0


def batched_loop(cfg, data, seeds) -> float:
    model = build_batched(cfg.model, seeds)
    t0 = clock()
    fit_batched(model, data, cfg.optimizer, cfg.train, seeds)
    return clock() - t0


def solo_run(cfg, run_dir: Path) -> float:
    """One seed recorded as a CLI run records it: monitor, tables, TensorBoard, files."""
    from torch.utils.tensorboard import SummaryWriter

    t0 = clock()
    write_config(run_dir, to_dict(cfg))
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    with SummaryWriter(str(run_dir)) as writer:
        monitor = GradientMonitor(model, writer, histograms=cfg.monitor.histograms)
        recorder = MonitorCallback(monitor, run_dir)
        try:
            result = fit(model, data, cfg.optimizer, cfg.train, callbacks=[EpochScalars(writer), recorder])
        finally:
            recorder.close()
            monitor.remove()
    # What each batched member writes: history, summary, accuracy plot, the verdict from its tables.
    write_outputs(run_dir, cfg, result, load_windows(run_dir), gradients_plot=False)
    return clock() - t0


def batched_run(cfg, seeds, root: Path, workers: int = 1) -> float:
    """K seeds as one batched model in this process, or split over ``workers`` processes as
    ``gradflow train --seeds`` splits them (each process a batched model of its share)."""
    dirs = [root / f"seed{s}" for s in seeds]
    for d in dirs:
        d.mkdir()
    t0 = clock()
    if workers == 1:
        train_members(cfg, seeds, dirs)
    else:
        train_seeds_in_workers(cfg, seeds, dirs, "cpu", workers, threads=1)
    return clock() - t0


def three_configs(epochs: int, seeds: list[int], workers: int, root: Path, histograms: bool) -> float:
    jobs = []
    for path in CONFIGS:
        cfg = load_config(path, [f"train.epochs={epochs}", f"monitor.histograms={str(histograms).lower()}"])
        dirs = [root / f"{cfg.name}-seed{s}" for s in seeds]
        for d in dirs:
            d.mkdir()
        jobs.append((to_dict(cfg), seeds, [str(d) for d in dirs], "cpu"))
    t0 = clock()
    LocalExecutor(workers).map(jobs, lambda i, summaries: None)
    return clock() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternate solo/batched order; best of N")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: CPU seconds (processes' sum for the split runs), which other jobs on a shared "
                             "machine do not inflate")
    parser.add_argument("--no-keras", action="store_true", help="skip the three configs against the Keras original")
    args = parser.parse_args(argv)
    global clock
    clock = cpu if args.clock == "cpu" else wall
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    cfg = load_config("configs/deep_relu.yaml", [f"train.epochs={args.epochs}"])
    data = load_dataset(cfg.data)
    quiet = load_config("configs/deep_relu.yaml", [f"train.epochs={args.epochs}", "monitor.histograms=false"])
    loop = {"solo": [], "batched": []}
    runs = {"solo": [], "batched": [], "split": []}
    lean = {"solo": [], "batched": [], "split": []}  # without TensorBoard histograms (the sweep files' setting)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        warm = load_config("configs/deep_relu.yaml", ["train.epochs=1"])  # imports, first plot: not timed
        (root / "warm").mkdir()
        solo_run(warm, root / "warm")
        batched_run(warm, seeds[:2], root / "warm")
        for r in range(args.repeats):
            order = ("solo", "batched") if r % 2 == 0 else ("batched", "solo")  # neither always goes first
            for which in order:
                if which == "solo":
                    loop["solo"].append(solo_loop(cfg, data))
                    d = root / f"solo{r}"
                    d.mkdir()
                    runs["solo"].append(solo_run(cfg, d))
                    (root / f"solo-lean{r}").mkdir()
                    lean["solo"].append(solo_run(quiet, root / f"solo-lean{r}"))
                else:
                    loop["batched"].append(batched_loop(cfg, data, seeds))
                    d = root / f"batched{r}"
                    d.mkdir()
                    runs["batched"].append(batched_run(cfg, seeds, d))
                    (root / f"batched-lean{r}").mkdir()
                    lean["batched"].append(batched_run(quiet, seeds, root / f"batched-lean{r}"))
                    for table, config, name in ((runs, cfg, "split"), (lean, quiet, "split-lean")):
                        (root / f"{name}{r}").mkdir()
                        table["split"].append(batched_run(config, seeds, root / f"{name}{r}", args.workers))
        three = {}
        for histograms in () if args.no_keras else (True, False):
            d = root / f"three-{histograms}"
            d.mkdir()
            three[histograms] = three_configs(args.epochs, seeds, args.workers, d, histograms)
    k = len(seeds)
    print(f"deep_relu, {args.epochs} epochs, 1 thread per process, best of {args.repeats}, {args.clock} clock; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for title, table in (("training loop", loop), ("complete runs (monitor + run directories)", runs),
                         ("complete runs, monitor.histograms=false", lean)):
        solo, batched = min(table["solo"]), min(table["batched"])
        print(f"  {title}: 1 seed {solo:.1f} s | {k} seeds batched in one process {batched:.1f} s | "
              f"ratio {batched / solo:.2f}x (target <= 2x; {k} solo runs would be {k}x)")
        if table.get("split"):
            split = min(table["split"])
            print(f"  {' ' * len(title)}  {k} seeds over {args.workers} processes (gradflow train --seeds) "
                  f"{split:.1f} s | ratio {split / solo:.2f}x"
                  + (" (CPU summed over the processes, their start-up included)" if args.clock == "cpu" else ""))
    for histograms, seconds in three.items():
        print(f"shallow_tanh + deep_tanh + deep_relu x {k} seeds, {args.workers} workers, complete runs, "
              f"histograms {'on' if histograms else 'off'}: {seconds:.1f} s | ratio to one Keras run "
              f"(~{KERAS_SECONDS:.0f} s): {seconds / KERAS_SECONDS:.2f} (target < 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
