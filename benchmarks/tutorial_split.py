"""The monitor's cost on the tutorial's MLP, split into its window (``log()``) and the rest.

``overhead.py``'s tutorial workload (the deep ReLU MLP, batch 32, one window per epoch of 16
steps, a TensorBoard writer, the default monitor), timed by CPU clock against a bare copy in
interleaved rounds, as overhead.py does; each round also times the ``log()`` calls, so the
monitor's cost per step is split into its window and the rest (the step hooks, the forward
hooks, the writer's thread). Medians over the rounds, the first dropped as warm-up.

    python benchmarks/tutorial_split.py              # 7 rounds
    python benchmarks/tutorial_split.py --rounds 15 --no-writer
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import overhead  # noqa: E402

from gradflow import GradientMonitor  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-writer", action="store_true", help="writer=None: the window without TensorBoard")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    overhead.CLOCK = time.process_time
    work = overhead.tutorial_mlp()
    bare, monitored = copy.deepcopy(work.model), copy.deepcopy(work.model)
    bare_optimizer = torch.optim.SGD(bare.parameters(), lr=1e-3, momentum=0.9)
    optimizer = torch.optim.SGD(monitored.parameters(), lr=1e-3, momentum=0.9)
    with tempfile.TemporaryDirectory() as logdir:
        writer = None if args.no_writer else SummaryWriter(logdir)
        monitor = GradientMonitor(monitored, writer)
        in_log = [0.0]

        def on_epoch(epoch: int) -> None:
            start = time.process_time()
            monitor.log(epoch)
            in_log[0] += time.process_time() - start

        steps = work.epochs * -(-len(work.inputs) // work.batch)
        rows: dict[str, list[float]] = {"ratio": [], "log us/step": [], "rest us/step": [], "bare us/step": []}
        for round_ in range(args.rounds + 1):
            seconds_bare = overhead.train(work, bare, bare_optimizer)
            in_log[0] = 0.0
            seconds = overhead.train(work, monitored, optimizer, None, on_epoch)
            if round_ == 0:
                gc.collect()
                continue
            rows["ratio"].append(seconds / seconds_bare)
            rows["log us/step"].append(in_log[0] / steps * 1e6)
            rows["rest us/step"].append((seconds - in_log[0] - seconds_bare) / steps * 1e6)
            rows["bare us/step"].append(seconds_bare / steps * 1e6)
        monitor.remove()
        if writer is not None:
            writer.close()
    print(f"{work.name}, {'no writer' if args.no_writer else 'TensorBoard'}: medians of {args.rounds} interleaved "
          f"rounds (cpu clock), load average {os.getloadavg()[0]:.1f}")
    for name, values in rows.items():
        print(f"  {name:14s} {statistics.median(values):8.2f}" + ("x" if name == "ratio" else ""))


if __name__ == "__main__":
    main()
