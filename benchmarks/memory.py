"""What the monitor adds to a training process's peak memory, as a multiple of the trainable
parameters' bytes (issue 20's target: at most 1.1x: one copy of the trainable weights for the
update ratios, nothing per frozen weight).

Each model runs in a fresh child process: the monitor's code paths are warmed on a tiny model
first (imports, numba's cached kernels), then the model trains a few plain steps (peak RSS A),
then a few monitored steps with two windows logged (peak RSS B). The overhead is B - A: what
the monitor's buffers and temporaries added to the peak, with the interpreter, torch, the
model, its gradients and the optimizer already counted in A.

    python benchmarks/memory.py                  # both models
    python benchmarks/memory.py --models big     # the model with one 50M-element parameter

Models: ``big``, an MLP whose middle Linear has a 10000 x 5000 weight (50M elements, 200 MB);
``lora``, a frozen 4096 x 4096 Linear base (64 MB, requires_grad False) with a rank-8 LoRA
adapter (65,536 trainable elements, 256 KB): the frozen base must cost nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MODELS = ("big", "lora")


class LoRALinear(nn.Module):
    """y = base(x) + x A^T B^T, the base frozen (Hu et al. 2021, rank ``rank``)."""

    def __init__(self, features: int, rank: int = 8) -> None:
        super().__init__()
        self.base = nn.Linear(features, features, bias=False)
        self.base.weight.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, features) * 0.01)
        self.b = nn.Parameter(torch.zeros(features, rank))

    def forward(self, x):
        return self.base(x) + x @ self.a.T @ self.b.T


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "big":
        return nn.Sequential(nn.Linear(64, 5000), nn.ReLU(), nn.Linear(5000, 10000), nn.ReLU(),
                             nn.Linear(10000, 1)), torch.randn(8, 64)
    return nn.Sequential(LoRALinear(4096), nn.GELU(), nn.Linear(4096, 1)), torch.randn(8, 4096)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def train(model: nn.Module, x: torch.Tensor, optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def child(name: str) -> dict:
    from gradflow.monitor import GradientMonitor
    torch.set_num_threads(1)
    tiny = nn.Sequential(nn.Linear(70_000, 2), nn.Tanh(), nn.Linear(2, 1))   # warms the large and small paths
    with GradientMonitor(tiny) as monitor:
        train(tiny, torch.randn(2, 70_000), torch.optim.SGD(tiny.parameters(), lr=0.01), 2)
        monitor.log(0)
    del tiny, monitor
    model, x = build(name)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    train(model, x, optimizer, 3)
    bare = peak_mib()
    with GradientMonitor(model) as monitor:
        for window in range(2):
            train(model, x, optimizer, 3)
            monitor.log(window)
    monitored = peak_mib()
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return {"model": name, "bare_mib": bare, "monitored_mib": monitored, "trainable_mib": trainable / 2**20,
            "frozen_mib": frozen / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    print(f"torch {torch.__version__}; peak RSS overhead of the monitor (B - A), each model in its own process")
    print(f"  {'model':44s} {'trainable':>10s} {'frozen':>9s} {'overhead':>9s} {'x trainable':>12s}")
    for name in args.models:
        out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        extra = row["monitored_mib"] - row["bare_mib"]
        label = {"big": "MLP with a 50M-element weight", "lora": "LoRA rank 8 on a frozen 4096x4096 base"}[name]
        print(f"  {label:44s} {row['trainable_mib']:8.1f}MB {row['frozen_mib']:7.1f}MB {extra:7.1f}MB "
              f"{extra / row['trainable_mib']:11.2f}x")


if __name__ == "__main__":
    main()
