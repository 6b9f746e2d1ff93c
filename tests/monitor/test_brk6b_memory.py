"""Weights that the fused float32 kernel does not take (bfloat16, float16, float64 on the CPU)
are folded by torch ops at log(): that path made float64 copies of a million values at a time,
six of them alive at once, so a bfloat16 MLP of 4 MB reached 36 MB over its peak in log()
(peak RSS 9.2x its trainable bytes, /tmp probe of brk6b). Now the float64 temporaries are
CPU-cache sized on the CPU. Oracles: the weights themselves (L1, L2, update ratio in float64),
and torch's profiler for the largest allocation made during log()."""

import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from gradflow import GradientMonitor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_weights_of_other_dtypes_fold_exactly_without_megabyte_temporaries(dtype):
    torch.manual_seed(0)
    model = nn.Linear(1024, 1024).to(dtype)                 # a 1M-element weight: many chunks
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    start = model.weight.detach().double().clone()
    with GradientMonitor(model, None, activations=False) as monitor:
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(4, 1024, dtype=dtype)).float().pow(2).mean().backward()
            optimizer.step()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            rows = monitor.log(0)
    now = model.weight.detach().double()
    row = rows["weight"]
    assert row["weight_l1"] == pytest.approx(now.abs().sum().item(), rel=1e-12)
    assert row["weight_norm"] == pytest.approx(now.norm().item(), rel=1e-12)
    assert row["weight_update_ratio"] == pytest.approx(((now - start).norm() / start.norm()).item(), rel=1e-9)
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert largest <= 1 << 20, f"log() made a {largest / 2**20:.1f} MB tensor for a {dtype} weight"
