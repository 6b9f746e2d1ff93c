"""A wrapper whose inner optimizers each hold part of the parameters: the wrapper's step and the
inner steps inside it are one training step. ZeroRedundancyOptimizer on several ranks (each
rank's inner optimizer holds its shard of the parameters), and a wrapper that steps one inner
optimizer per parameter kind (Muon for matrices, AdamW for the rest). Each parameter counts one
step per training step. Oracle: the model's .grad before each step (no pre-hooks here)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import nn
from wrapped_optimizers import Combined


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def _train(model, optimizer, steps=3):
    from gradflow import GradientMonitor

    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.randn(16, 1)
    norms = {name: [] for name, _ in model.named_parameters()}
    with GradientMonitor(model, activations=False) as monitor:
        for i in range(steps):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x * (i + 1)), y).backward()
            for name, p in model.named_parameters():
                norms[name].append(p.grad.double().norm().item())
            optimizer.step()
        rows = monitor.log(0)
    return ({name: (row["steps"], row["norm"]) for name, row in rows.items()},
            {name: sum(v) / len(v) for name, v in norms.items()}, monitor.history[-1].overall["steps"])


def test_a_wrapper_over_inner_optimizers_on_parts_counts_one_step():
    model = _model()
    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    optimizer = Combined(torch.optim.SGD(matrices, lr=0.01, momentum=0.9), torch.optim.AdamW(others, lr=0.01))
    rows, oracle, steps = _train(model, optimizer)
    assert steps == 3
    for name, (count, norm) in rows.items():
        assert count == 3, (name, rows)
        assert norm == pytest.approx(oracle[name], rel=1e-6)


def _zero_rank(rank, world, path, results):
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        model = _model()
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=0.01)
        results.put((rank, _train(model, optimizer)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_zero_redundancy_optimizer_on_two_ranks_counts_one_step_per_rank():
    """Rank 0's inner Adam holds 2.weight alone (ZeRO partitions by size): it was counted twice."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    path = os.path.join(tempfile.mkdtemp(), "store")
    context = mp.get_context("spawn")
    results = context.Queue()
    procs = [context.Process(target=_zero_rank, args=(rank, 2, path, results)) for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        got = dict(results.get(timeout=120) for _ in procs)
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    for rank in (0, 1):
        rows, oracle, steps = got[rank]
        assert steps == 3, (rank, rows)
        for name, (count, norm) in rows.items():
            assert count == 3, (rank, name, rows)
            assert norm == pytest.approx(oracle[name], rel=1e-6)
