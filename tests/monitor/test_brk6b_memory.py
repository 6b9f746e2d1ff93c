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


def test_a_sparse_gradient_is_reduced_from_its_values_not_a_dense_copy(tmp_path):
    """nn.Embedding(sparse=True): the monitor made a dense copy of the whole gradient at each
    step (a 30M-element embedding: peak RSS 2.00x its trainable bytes against 1.00x with a dense
    gradient). Oracle: the same steps' gradients made dense by the test, and the same model with
    a dense gradient under a second monitor; torch's profiler for the largest allocation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    rows, counts = {}, {}
    for sparse in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(20_000, 16, sparse=sparse), nn.Flatten(), nn.Linear(16 * 4, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with SummaryWriter(tmp_path / str(sparse)) as writer, \
                GradientMonitor(model, writer, histogram_every=1, activations=False) as monitor:
            largest = 0
            for step in range(3):
                optimizer.zero_grad()
                index = torch.randint(0, 20_000, (8, 4))
                index[0, :2] = 7                                  # a row twice in one batch: coalesced
                model(index).pow(2).mean().backward()
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    optimizer.step()
                    if step == 2:
                        rows[sparse] = monitor.log(0)["0.weight"]
                largest = max(largest, max(event.cpu_memory_usage for event in prof.events()))
        if sparse:
            assert largest < 20_000 * 16 * 4 / 4, f"a {largest} B allocation for a 1.28 MB sparse gradient"
        events = EventAccumulator(str(tmp_path / str(sparse)), size_guidance={"histograms": 0}).Reload()
        (point,) = events.Histograms("grad/0/weight")
        counts[sparse] = (list(point.histogram_value.bucket_limit), list(point.histogram_value.bucket),
                          point.histogram_value.num)
    for key, value in rows[False].items():        # the weights: sparse and dense SGD round apart
        assert rows[True][key] == pytest.approx(value, rel=1e-4 if key.startswith("weight") else 1e-6, abs=1e-12), key
    assert rows[True]["zero_fraction"] > 0.99
    assert counts[True] == counts[False]
