"""The monitor's cost on the tutorial's MLP, part by part: each row adds one stage of a window.

``overhead.py``'s tutorial workload (the deep ReLU MLP, batch 32, one window per epoch of 16
steps), timed by process CPU time (TensorBoard's writer thread included) against a bare copy,
all variants interleaved round by round in one process; each ratio is the median of per-round
ratios to the bare loop:

- ``no-log``: the default monitor, with ``log()`` replaced by the parts' fold and reset: the
  steps, the taps and the folds;
- ``no-writer``: ``writer=None``: adds reading the window into rows and scalars;
- ``null-sink``: a sink that takes histograms and writes nothing: adds building them;
- ``tensorboard``: a ``SummaryWriter`` (the benchmark's setting): adds the TensorBoard event.

    python benchmarks/tutorial_parts.py              # 9 rounds of 20 epochs
    python benchmarks/tutorial_parts.py --rounds 15
"""

from __future__ import annotations

import argparse
import copy
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
from gradflow.monitor.sinks import Sink  # noqa: E402

VARIANTS = ("bare", "no-log", "no-writer", "null-sink", "tensorboard")


class NullSink(Sink):
    """Takes every window's scalars and histograms and writes nothing."""

    def log(self, scalars, histograms, step) -> None:
        pass


def make(variant: str, work: overhead.Workload, logdir: str):
    model = copy.deepcopy(work.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if variant == "bare":
        return model, optimizer, None
    writer = {"null-sink": NullSink(), "tensorboard": SummaryWriter(logdir)}.get(variant)
    monitor = GradientMonitor(model, writer)
    if variant == "no-log":
        def fold_and_reset(step, monitor=monitor):
            for part in monitor.parts.values():
                part.fold()
            monitor._start_window()
        monitor.log = fold_and_reset
    return model, optimizer, monitor


def epochs(run, batches, count: int, loss=torch.nn.functional.binary_cross_entropy_with_logits) -> float:
    """CPU seconds per step of ``count`` epochs, a window closed after each."""
    model, optimizer, monitor = run
    start = time.process_time()
    for epoch in range(count):
        for x, y in batches:
            optimizer.zero_grad()
            loss(model(x), y).backward()
            optimizer.step()
        if monitor is not None:
            monitor.log(epoch)
    return (time.process_time() - start) / (count * len(batches))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--epochs", type=int, default=20, help="epochs per variant and round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    work = overhead.tutorial_mlp()
    batches = [(work.inputs[b:b + work.batch], work.targets[b:b + work.batch])
               for b in range(0, len(work.inputs), work.batch)]
    with tempfile.TemporaryDirectory() as logdir:
        runs = {variant: make(variant, work, logdir) for variant in VARIANTS}
        for run in runs.values():
            epochs(run, batches, 3)                       # warm-up
        times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for _ in range(args.rounds):
            for variant, run in runs.items():
                times[variant].append(epochs(run, batches, args.epochs))
        for _, _, monitor in runs.values():
            if monitor is not None:
                monitor.remove()
    print(f"tutorial deep MLP, {len(batches)} steps a window, {args.rounds} rounds of {args.epochs} epochs "
          f"(process CPU time), load average {os.getloadavg()[0]:.1f}")
    for variant in VARIANTS:
        ratio = statistics.median(t / b for t, b in zip(times[variant], times["bare"]))
        print(f"  {variant:12s} {statistics.median(times[variant]) * 1e6:7.1f} us/step   {ratio:.3f}x")


if __name__ == "__main__":
    main()
