"""Values below float32's normal range (0 < |g| < 2^-126 = 1.2e-38, subnormal) are not zeros: a
vanishing gradient is not a dead one. The sign/exponent bins once put exponent 0 (zeros and
subnormals alike) in the zero bin, in stats.sign_exponent_bins and in the numba kernels, so
zero_fraction read 1.0 where 1/8 of the values were zero, and histograms drew subnormals as
zeros. Now only +0 and -0 are zeros (float64 below float32's range was already mapped to the
lowest non-zero bin: test_coverage.test_float64_gradients_keep_their_range).

Every kind, on both reduction paths (``reduction_path``: numba's kernels and torch's ops, the
accelerators' way): float32 and bfloat16 gradients (bfloat16's subnormals are float32's),
float16 (its subnormals, below 6.1e-5, are normal in float32: right before too, checked here),
small (copied, reduced together) and large (reduced from .grad) parameters, both signs, and +0
and -0 mixed in; the weights' and the activations' histograms share the bins. Oracles: (g == 0)
over the very values applied, and numpy's histogram of the values over the histogram's edges.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from gradflow import GradientMonitor
from gradflow.monitor import stats as S

SUBNORMAL = 1e-39                # float32's smallest normal is 1.18e-38
SCALES = {torch.float32: SUBNORMAL, torch.bfloat16: SUBNORMAL, torch.float16: 1e-6}   # float16's: below 6.1e-5
SIZES = {"small": 64, "large": 70_000}              # the large path starts at 2^16 elements (tensors.LARGE_PARAMETER)


def tiny_values(size: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Subnormals of both signs (in ``dtype``), 1/16 of them +0.0 and 1/16 -0.0."""
    generator = torch.Generator().manual_seed(seed)
    values = (torch.randn(size, dtype=torch.float64, generator=generator) * SCALES[dtype]).to(dtype)
    values[: size // 16] = 0.0
    values[size // 16: size // 8] = -0.0
    return values


@pytest.fixture
def histogram_path(reduction_path, monkeypatch):
    """With torch's ops, the histograms are built by numpy too (stats._HISTOGRAM_KERNELS off)."""
    if reduction_path == "torch-ops":
        monkeypatch.setattr(S, "_HISTOGRAM_KERNELS", False)
    return reduction_path


def applied_row(values: torch.Tensor, writer=None) -> dict:
    """The monitor's row of a parameter whose one applied gradient is ``values``."""
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.zeros(values.numel(), dtype=values.dtype))
    optimizer = torch.optim.SGD([holder.weight], lr=0.0)
    with GradientMonitor(holder, writer, activations=False) as monitor:
        holder.weight.grad = values.clone()
        optimizer.step()
        return monitor.log(0)["weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_subnormal_gradients_are_not_zeros(dtype, size, reduction_path):
    values = tiny_values(size, dtype)
    if dtype != torch.float16:
        assert (values.float().abs() < torch.finfo(torch.float32).tiny).all()     # subnormal in float32
    row = applied_row(values)
    assert row["mean_abs"] == pytest.approx(values.double().abs().mean().item(), rel=1e-6)   # right already
    assert row["zero_fraction"] == pytest.approx((values == 0).double().mean().item())
    assert row["zero_fraction"] < 0.2


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_a_window_of_steps_counts_only_exact_zeros(size, reduction_path):
    """Three steps through an optimizer that steps: normal values, subnormals of one sign, then
    all zeros; zero_fraction counts the zeros of every step."""
    torch.manual_seed(1)
    model = nn.Linear(size, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    steps = [torch.randn(1, size), tiny_values(size, torch.float32).abs().view(1, -1) * -1.0, torch.zeros(1, size)]
    with GradientMonitor(model, activations=False) as monitor:
        for grad in steps:
            model.weight.grad = grad.clone()
            optimizer.step()
        row = monitor.log(0)["weight"]
    zeros = sum(int((g == 0).sum()) for g in steps)
    assert row["zero_fraction"] == pytest.approx(zeros / (3 * size))
    assert row["steps"] == 3


def bucket_counts(histogram) -> tuple[np.ndarray, np.ndarray]:
    """A TensorBoard histogram's edges (min, then each bucket's right limit) and counts."""
    return np.array([histogram.min, *histogram.bucket_limit]), np.array(histogram.bucket)


def assert_histogram_of(histogram, values: np.ndarray) -> None:
    """Each bucket counts the values between its edges (right-closed for negatives, left-closed
    for positives, as the bins), and the zero bucket the exact zeros alone."""
    edges, counts = bucket_counts(histogram)
    values = values.astype(np.float64)
    index = np.where(values < 0, np.searchsorted(edges, values, "left"), np.searchsorted(edges, values, "right")) - 1
    np.testing.assert_array_equal(np.bincount(index, minlength=len(counts)), counts)
    zero_bucket = int(np.searchsorted(edges, 0.0, "right")) - 1
    assert counts[zero_bucket] == np.sum(values == 0)
    assert histogram.min <= values.min() and histogram.max >= values.max() and histogram.num == len(values)


def histograms(logdir) -> dict:
    events = EventAccumulator(str(logdir), size_guidance={"histograms": 0}).Reload()
    return {tag: events.Histograms(tag)[-1].histogram_value for tag in events.Tags()["histograms"]}


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_gradient_histograms_draw_subnormals_outside_the_zero_bucket(tmp_path, size, histogram_path):
    """The value histogram's zero bucket holds the zeros alone; log10 |g| counts every non-zero
    value, from log10(2^-149) = -44.9, the smallest subnormal (its min)."""
    values = tiny_values(size, torch.float32)
    with SummaryWriter(tmp_path) as writer:
        applied_row(values, writer)
    drawn = histograms(tmp_path)
    assert_histogram_of(drawn["grad/weight"], values.numpy())
    log10 = drawn["1_grad_log10/weight"]
    magnitudes = np.log10(np.abs(values.numpy()[values.numpy() != 0]).astype(np.float64))
    edges, counts = bucket_counts(log10)
    np.testing.assert_array_equal(np.histogram(magnitudes, edges)[0], counts)
    assert log10.num == len(magnitudes) and log10.min == pytest.approx(-149 * math.log10(2.0))


@pytest.mark.parametrize("size", [8, 300, 70_000], ids=["tiny", "small", "large"])
def test_weight_histograms_draw_subnormals_outside_the_zero_bucket(tmp_path, size, histogram_path):
    """Weights share the bins: subnormal weights (a layer decayed to nothing) are no zeros. The
    three sizes take the three ways the weights' kernels count (one scalar pass, a short row, blocks)."""
    model = nn.Linear(size, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(tiny_values(size, torch.float32, seed=2).view(1, -1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with SummaryWriter(tmp_path) as writer, GradientMonitor(model, writer, activations=False) as monitor:
        model(torch.randn(2, size)).sum().backward()
        optimizer.step()
        monitor.log(0)
    assert_histogram_of(histograms(tmp_path)["weight/weight"], model.weight.detach().reshape(-1).numpy())


@pytest.mark.parametrize("width", [16, 1024], ids=["small", "large"])      # 8 x 1024 outputs: reduced at once
def test_activation_histograms_draw_subnormals_outside_the_zero_bucket(tmp_path, width, histogram_path):
    """A ReLU whose outputs are subnormal or zero: the histogram's zero bucket counts the zeros
    alone, and no unit with a subnormal output is dead."""
    model = nn.Sequential(nn.ReLU(), nn.Linear(width, 1))
    outputs = []
    model[0].register_forward_hook(lambda module, inputs, output: outputs.append(output.detach().clone()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x = tiny_values(8 * width, torch.float32, seed=3).view(8, width)
    with SummaryWriter(tmp_path) as writer, GradientMonitor(model, writer, activations_every=1) as monitor:
        model(x).sum().backward()
        optimizer.step()
        monitor.log(0)
    window = monitor.history[-1]
    output = outputs[-1]
    assert 0 < (output == 0).sum() < output.numel() and (output[output != 0] < 2.0 ** -126).all()
    assert_histogram_of(histograms(tmp_path)["activation/0"], output.reshape(-1).numpy())
    dead = (output <= 0).all(dim=0).double().mean().item()
    assert window.activations["0"]["dead_fraction"] == pytest.approx(dead)


@pytest.mark.parametrize("kernels", [True, False], ids=["numba", "numpy"])
def test_histogram_edges_contain_subnormals_of_either_sign(kernels, monkeypatch):
    """Subnormals of one sign alone: the range (min, max) still holds them, and the log10 |x|
    histogram starts at the smallest subnormal, in both histogram builders."""
    if not kernels:
        monkeypatch.setattr(S, "_HISTOGRAM_KERNELS", False)
    elif S.histogram_kernels() is None:
        pytest.skip("numba is not installed")
    for sign in (1.0, -1.0):
        values = torch.tensor([1e-45, 3e-40, 1.1e-38, 2.0 ** -126]) * sign
        counts = S.sign_exponent_counts(values).numpy()[None]
        (value,), (log10,) = S.value_histograms(counts), S.log10_abs_histograms(counts)
        assert value.min <= values.min().item() and value.max >= values.max().item()
        assert value.num == log10.num == 4
        assert log10.min == pytest.approx(-149 * math.log10(2.0)) and log10.limits == [pytest.approx(-125 * math.log10(2.0))]
