"""Where the monitor's time goes on each model: its pieces timed inside real training steps.

Wraps the monitor's entry points with timers (nested pieces are reported inside their caller)
and prints ms per step for each, beside the bare step, for the workloads of ``shapes.py``, and
the minor page faults of the steps of each (a monitored step's time that no piece accounts for
has been page faults: the allocator handing freed gradients back to the OS and taking them again).

    python benchmarks/profile_monitor.py                       # every shape, 2 windows of 10 steps
    python benchmarks/profile_monitor.py --models resnet18 --windows 3
    python benchmarks/profile_monitor.py --models wide --steps 32      # the wide MLP as overhead.py logs it
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import os
import resource
import sys
import tempfile
import time

import torch
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from shapes import PROFILED

from gradflow import GradientMonitor
from gradflow.monitor import (
    activations,
    gradients,
    kernels,
    monitor,
    stats,
    weights,
    window,
)

SPENT: collections.Counter = collections.Counter()
VALUES: collections.Counter = collections.Counter()


def timed(owner, name: str, label: str, count=None) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - t
            if count is not None:
                VALUES[label] += count(*args, **kwargs)
    setattr(owner, name, wrapper)


def instrument() -> None:
    timed(gradients.Gradients, "record", "grad.record (all)")
    timed(gradients.Gradients, "_reduce_large", "grad.large fold",
          lambda self, plan, *_: sum(self.numel[i] for i in plan.large))
    timed(gradients.Gradients, "reduce", "grad.small reduce")
    timed(activations.Activations, "reduce", "act.reduce (all)")
    timed(activations.Activations, "_reduce_large", "act.large fold+positives",
          lambda self, large, *_: sum(entry[1].numel() for entry in large))
    timed(activations.Activations, "_count_positive", "act.count_positive")
    timed(stats.Scratch, "fold", "Scratch.fold (kernel+copies)", lambda self, jobs, *_: sum(j[0].numel() for j in jobs))
    timed(kernels, "fold_all", "kernels.fold_all", lambda jobs, *_: sum(j[0].size for j in jobs))
    timed(monitor.GradientMonitor, "log", "log (all)")
    timed(monitor.GradientMonitor, "_read_back", "log._read_back")
    timed(weights.Weights, "summary", "log.weights summary")
    timed(window.HistogramRequests, "build", "log.histograms build")
    from gradflow.monitor import sinks
    timed(sinks.TensorBoardSink, "log", "log.sink (TensorBoard)")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def steps(model, x, y, loss, optimizer, n, faults=None):
    """Seconds for ``n`` steps; adds their minor page faults to ``faults[0]``."""
    t = time.perf_counter()
    before = minor_faults()
    for _ in range(n):
        optimizer.zero_grad(set_to_none=True)
        loss(model(x), y).backward()
        optimizer.step()
    if faults is not None:
        faults[0] += minor_faults() - before
    return time.perf_counter() - t


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(PROFILED), default=list(PROFILED))
    parser.add_argument("--steps", type=int, default=10, help="steps per window (overhead.py: 10; 32 for wide)")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--activations", default="on", choices=["on", "off"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    instrument()
    for name in args.models:
        torch.manual_seed(0)
        model, x, y, loss = PROFILED[name]()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        plain = copy.deepcopy(model)                      # the bare twin, stepped in alternate windows
        plain_optimizer = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
        bare, total = [], 0.0
        bare_faults, monitored_faults = [0], [0]
        with tempfile.TemporaryDirectory() as d, SummaryWriter(d) as writer:
            mon = GradientMonitor(model, writer, activations=args.activations == "on")
            for w in range(2):                            # warm-up: plans, caches, compiled kernels
                steps(plain, x, y, loss, plain_optimizer, args.steps)
                steps(model, x, y, loss, optimizer, args.steps)
                mon.log(w)
            SPENT.clear(), VALUES.clear()
            for w in range(args.windows):
                bare.append(steps(plain, x, y, loss, plain_optimizer, args.steps, bare_faults))
                t = time.perf_counter()
                steps(model, x, y, loss, optimizer, args.steps, monitored_faults)
                mon.log(w + 2)
                total += time.perf_counter() - t
            mon.remove()
        n = args.steps * args.windows
        b = sum(bare) / n * 1e3
        m = total / n * 1e3
        grads = sum(p.numel() for p in model.parameters())
        print(f"\n{name}: {grads / 1e6:.2f} M parameters, bare {b:.1f} ms/step, monitored {m:.1f} ms/step "
              f"({m / b:.2f}x)")
        for label, seconds in sorted(SPENT.items()):
            per = seconds / n * 1e3
            extra = ""
            if VALUES[label]:
                extra = f"  {VALUES[label] / n / 1e6:6.2f} M values/step, {seconds / VALUES[label] * 1e9:5.2f} ns/value"
            print(f"  {label:32s} {per:8.2f} ms/step ({per / b * 100:5.1f}% of a step){extra}")
        # A fault is a 4 KB page the allocator returned to the OS and takes back, zeroed: glibc trims
        # the top of its heap when freed gradients end up there (docs/benchmarks.md, "Large-tensor path").
        print(f"  {'minor page faults per step':32s} bare {bare_faults[0] / n:8.0f}, monitored {monitored_faults[0] / n:8.0f}"
              f" (log() not counted)")


if __name__ == "__main__":
    main()
