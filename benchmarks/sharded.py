"""What closing a window costs on a sharded model: the reduction against the window's training time.

    python benchmarks/sharded.py                 # FSDP2 on 2 and 4 CPU ranks (gloo), 10-step windows
    python benchmarks/sharded.py --layers 100 --width 128 --steps 10 --worlds 2

Each world size runs one FSDP2 model (``--layers`` Linear(width, width) layers, each its own
``fully_shard`` group) for three windows of ``--steps`` steps, twice: with no monitor, then with a
``GradientMonitor`` on every rank, then once more with no monitor. Printed per world size, as the
fastest window on rank 0 (the machine may be shared; the first window of each run warms up):

- the window's training time without the monitor, and with it (the ratio is the monitor's whole cost);
- the window's reduction (``ShardLayout.reduce``: one MAX over the world, then one SUM and one MAX
  all-reduce per parameter group) and the whole ``log()`` (reduction, read-back, rows, histograms);
- what reading the same per-parameter norms one ``full_tensor()`` at a time costs, once.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(layers: int, width: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def windows(model, optimizer, steps: int, width: int, monitor=None) -> tuple[list[float], list[float], list[float]]:
    """Four windows: (training seconds, reduction seconds, log seconds) of each."""
    from gradflow.monitor import sharding

    reductions: list[float] = []
    original = sharding.ShardLayout.reduce

    def timed(self, parts, recorded):
        start = time.perf_counter()
        out = original(self, parts, recorded)
        reductions.append(time.perf_counter() - start)
        return out

    sharding.ShardLayout.reduce = timed
    train, logs = [], []
    x = torch.randn(32, width)
    try:
        for window in range(4):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                optimizer.zero_grad()
                model(x).square().mean().backward()
                optimizer.step()
            train.append(time.perf_counter() - start)
            if monitor is not None:
                start = time.perf_counter()
                monitor.log(window)
                logs.append(time.perf_counter() - start)
    finally:
        sharding.ShardLayout.reduce = original
    return train, reductions, logs


def worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        from gradflow.monitor import GradientMonitor

        model = build(args.layers, args.width)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        bare, _, _ = windows(model, optimizer, args.steps, args.width)
        monitor = GradientMonitor(model, None, activations=False, histograms=True)
        watched, reductions, logs = windows(model, optimizer, args.steps, args.width, monitor)
        monitor.remove()
        again, _, _ = windows(model, optimizer, args.steps, args.width)
        dist.barrier()
        start = time.perf_counter()
        for p in model.parameters():                     # the one-at-a-time way: a collective per tensor
            p.grad.full_tensor().norm()
        one_by_one = time.perf_counter() - start
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"bare": bare[1:] + again[1:], "watched": watched[1:], "reduce": reductions[1:], "log": logs[1:],
                           "one_by_one": one_by_one, "groups": len(monitor._sharding.groups),
                           "params": len(monitor.names)}, f)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    print(f"FSDP2 on CPU (gloo), {args.layers} x Linear({args.width}, {args.width}) + Tanh, AdamW, "
          f"windows of {args.steps} steps; the fastest of 3 windows on rank 0")
    print(f"{'ranks':>5} {'params':>6} {'groups':>6} {'window ms':>10} {'monitored':>10} {'ratio':>6} "
          f"{'reduce ms':>10} {'reduce/window':>13} {'log ms':>8} {'full_tensor x params ms':>24}")
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rank0.json")
            mp.spawn(worker, args=(world, free_port(), args, out), nprocs=world, join=True)
            with open(out) as f:
                r = json.load(f)
        bare, watched = min(r["bare"]) * 1e3, min(r["watched"]) * 1e3
        reduce, log = min(r["reduce"]) * 1e3, min(r["log"]) * 1e3
        print(f"{world:>5} {r['params']:>6} {r['groups']:>6} {bare:>10.1f} {watched:>10.1f} {watched / bare:>6.2f} "
              f"{reduce:>10.1f} {reduce / watched:>13.3f} {log:>8.1f} {r['one_by_one'] * 1e3:>24.1f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
