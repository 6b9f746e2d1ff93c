"""What the monitor adds to a training process's peak memory, as a multiple of the trainable
parameters' bytes (issue 20's target: at most 1.1x: one copy of the trainable weights for the
update ratios, nothing per frozen weight).

Each model runs in a fresh child process: the monitor's code paths are warmed on a tiny model
first (imports, numba's kernels, each reduction path once: one-time costs any process pays
once), then the model trains a few plain steps (peak RSS A), then a few monitored steps with
two windows logged (peak RSS B). The overhead is B - A: what the monitor's buffers and
temporaries added to the peak, with the interpreter, torch, the model, its gradients and the
optimizer already counted in A.

Part of it does not grow with the model: the monitor's own objects, its per-window history, the
pending budget (``tensors.PENDING_ELEMENTS``, 256 KB at most) and the allocator's rounding
(glibc's heap grows by 128 KB steps, and a new allocation pattern fragments it). That fixed part
is measured the same way on a model of 97 parameters (``tiny``) and printed apart; the target
is on the part that scales with the model, overhead - fixed. Each figure is the median of
``--repeats`` child processes (RSS moves in pages and heap steps: one run varies by +-0.2 MB).

    python benchmarks/memory.py                  # every model
    python benchmarks/memory.py --models big     # the model with one 50M-element parameter

Models: ``big``, an MLP whose middle Linear has a 10000 x 5000 weight (50M elements, 200 MB);
``lora``, a frozen 4096 x 4096 Linear base (64 MB, requires_grad False) with a rank-8 LoRA
adapter (65,536 trainable elements, 256 KB): the frozen base must cost nothing; ``tiny``, an
8-8-1 MLP: the fixed part.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MODELS = ("big", "lora", "tiny")


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
    if name == "tiny":
        return nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 1)), torch.randn(8, 8)
    return nn.Sequential(LoRALinear(4096), nn.GELU(), nn.Linear(4096, 1)), torch.randn(8, 4096)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def train(model: nn.Module, x: torch.Tensor, optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def child(name: str, ideal: bool) -> dict:
    """Peak RSS before (A) and after (B) two monitored windows of ``name``; with ``ideal``, no
    monitor: one copy of the trainable weights is kept instead (what issue 20 allows)."""
    from gradflow.monitor import GradientMonitor
    from gradflow.monitor.footprint import held_bytes
    torch.set_num_threads(1)
    # Warms each reduction path once: large gradients (70,000 x 2), small ones (copied and batched),
    # a small bounded output (tanh), an output reduced at the forward's end (8,192 ReLU values).
    warm = nn.Sequential(nn.Linear(70_000, 2), nn.Tanh(), nn.Linear(2, 4096), nn.ReLU(), nn.Linear(4096, 1))
    with GradientMonitor(warm, activations_every=1) as monitor:
        train(warm, torch.randn(2, 70_000), torch.optim.SGD(warm.parameters(), lr=0.01), 2)
        monitor.log(0)
    del warm, monitor
    model, x = build(name)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    train(model, x, optimizer, 3)
    bare = peak_mib()
    held = 0
    if ideal:
        kept = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        for _ in range(2):
            train(model, x, optimizer, 3)
        del kept
    else:
        with GradientMonitor(model) as monitor:
            for window in range(2):
                train(model, x, optimizer, 3)
                monitor.log(window)
                held = max(held, held_bytes(monitor, model)[0])
    monitored = peak_mib()
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return {"model": name, "bare_mib": bare, "monitored_mib": monitored, "trainable_mib": trainable / 2**20,
            "frozen_mib": frozen / 2**20, "held_mib": held / 2**20}


def measure(name: str, repeats: int, ideal: bool = False) -> dict:
    """The child's row for ``name``, its overhead (MB) the median of ``repeats`` processes."""
    rows = []
    for _ in range(repeats):
        command = [sys.executable, __file__, "--child", name] + (["--ideal"] if ideal else [])
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    row = rows[0]
    row["overhead"] = statistics.median(r["monitored_mib"] - r["bare_mib"] for r in rows)
    row["runs"] = [round(r["monitored_mib"] - r["bare_mib"], 3) for r in rows]
    return row


LABELS = {"big": "MLP with a 50M-element weight", "lora": "LoRA rank 8 on a frozen 4096x4096 base",
          "tiny": "tiny 8-8-1 MLP"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="child processes per figure (median)")
    parser.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--ideal", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.ideal)))
        return
    print(f"torch {torch.__version__}; peak RSS overhead (B - A) in MB, each figure the median of {args.repeats} "
          "fresh processes")
    print("  monitor: the default GradientMonitor; one copy: no monitor, a copy of the trainable weights kept instead")
    print("  (the one copy issue 20 allows, in the same allocator); held: the monitor's tensors and arrays, exactly")
    print(f"  {'model':38s} {'trainable':>9s} {'frozen':>7s} {'monitor':>8s} {'x train':>8s} {'one copy':>9s} "
          f"{'x train':>8s} {'held':>7s} {'x train':>8s}")
    for name in args.models:
        row, ideal = measure(name, args.repeats), measure(name, args.repeats, ideal=True)
        t = row["trainable_mib"]
        print(f"  {LABELS[name]:38s} {t:9.3f} {row['frozen_mib']:7.1f} {row['overhead']:8.3f} {row['overhead'] / t:7.2f}x "
              f"{ideal['overhead']:9.3f} {ideal['overhead'] / t:7.2f}x {row['held_mib']:7.3f} {row['held_mib'] / t:7.2f}x"
              f"   runs: monitor {row['runs']}, one copy {ideal['runs']}")


if __name__ == "__main__":
    main()
