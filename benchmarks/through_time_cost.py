"""What the gradient-through-time profile costs on the LSTM LM (benchmarks/shapes.py: 2 x 256,
16 x 64 tokens), measured side by side in one process.

Two GradientMonitors on two copies of the model, one with ``through_time=True`` (the default:
every 50th step profiled) and one without, step alternately, so that a busy neighbour slows both
alike; a window closes every 10 steps. Prints the mean and median step of each and their ratio,
and what one profiled step costs against a plain one (a ``ThroughTime`` recorder switched on and
off on alternate steps).

    python benchmarks/through_time_cost.py              # 200 steps each, one thread
    python benchmarks/through_time_cost.py --steps 500
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import shapes  # noqa: E402

from gradflow import GradientMonitor  # noqa: E402
from gradflow.monitor.through_time import ThroughTime  # noqa: E402


def _step(model, optimizer, x, y, loss_fn) -> float:
    start = time.process_time()
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    optimizer.step()
    return time.process_time() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x, y, loss_fn = shapes.lstm_lm()
    runs = {}
    for on in (True, False):
        twin = copy.deepcopy(model)
        runs[on] = (twin, torch.optim.SGD(twin.parameters(), lr=1e-3, momentum=0.9),
                    GradientMonitor(twin, None, through_time=on))
    times = {True: [], False: []}
    for i in range(args.steps + 1):
        for on, (twin, optimizer, monitor) in runs.items():
            times[on].append(_step(twin, optimizer, x, y, loss_fn))
            if i % 10 == 9:
                monitor.log(i)
    for _, _, monitor in runs.values():
        monitor.remove()
    on, off = times[True][1:], times[False][1:]               # the first step warms up
    print(f"torch {torch.__version__}, 1 thread, process time, load average {os.getloadavg()[0]:.1f}")
    print(f"LSTM LM, {args.steps} steps each: with the profile (every 50th step) mean {statistics.mean(on) * 1e3:.1f} "
          f"ms, median {statistics.median(on) * 1e3:.1f} ms; without: mean {statistics.mean(off) * 1e3:.1f} ms, "
          f"median {statistics.median(off) * 1e3:.1f} ms; ratio of means {statistics.mean(on) / statistics.mean(off):.3f}x")
    recorder = ThroughTime(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    pairs = {True: [], False: []}
    for i in range(13):
        for active in (True, False):
            recorder.active = active
            start = time.process_time()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            recorder.record()
            if i:
                pairs[active].append(time.process_time() - start)
    recorder.remove()
    profiled, plain = statistics.median(pairs[True]), statistics.median(pairs[False])
    print(f"one profiled step {profiled * 1e3:.1f} ms against a plain one {plain * 1e3:.1f} ms: {profiled / plain:.2f}x "
          f"(medians of 12 pairs); at every 50th step +{(profiled / plain - 1) / 50:.1%} expected")


if __name__ == "__main__":
    main()
