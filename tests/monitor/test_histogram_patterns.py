"""Which steps the gradient histograms hold (``histogram_every``) where the set of parameters
with a gradient changes from step to step, for stacked members, with small gradients that wait
in runs of pending steps whose histogrammed steps differ from run to run. Oracle: the gradients
as the optimizer applies them (a step pre-hook registered before the monitor's, which runs
last), binned in numpy from their bits, over each parameter's 0th, N-th, 2N-th, ... step with a
gradient in the window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradflow import GradientMonitor

MEMBERS = 2


def numpy_bins(values: np.ndarray) -> np.ndarray:
    """The 512-bin sign/exponent histogram of float32 values, from their bits: exponent plus 256
    for a clear sign bit; a subnormal at exponent 1."""
    bits = values.astype(np.float32).view(np.uint32)
    exponent = (bits >> 23) & 0xFF
    exponent[(exponent == 0) & ((bits & 0x7FFFFF) != 0)] = 1
    return np.bincount(exponent + 256 * (bits >> 31 == 0), minlength=512)


def gradient(rng: np.random.Generator, shape: tuple[int, ...], step: int) -> torch.Tensor:
    g = rng.standard_normal(shape).astype(np.float32)
    if step % 3 == 1:
        g[..., ::4] = 0.0                            # zeros
    if step % 4 == 3:
        g[..., -1] = 1e-40                           # a subnormal: no zero
    if step % 7 == 5:
        g[0, 0] = np.nan                             # member 0 alone
    if step == 8:
        g[1] = 0.0                                   # member 1 all zeros (a dead layer)
    return torch.from_numpy(g)


@pytest.mark.parametrize("every", [3, 10])
def test_patterns_that_change_within_pending_runs_of_members(every, reduction_path):
    """``tiny`` has a gradient at even steps alone and ``small`` at steps not 2 mod 3, so the
    step's pattern changes; their copies (about 18,000 values a step) wait 3 to 4 steps before
    they are folded, in runs whose histogrammed steps differ. ``large`` is folded at once.
    Each member's histogram holds its parameter's steps 0, N, 2N, ... with a gradient; its zero
    fraction and non-finite count take every step."""
    model = nn.Module()
    model.small = nn.Parameter(torch.zeros(MEMBERS, 9000))
    model.tiny = nn.Parameter(torch.zeros(MEMBERS, 3))
    model.large = nn.Parameter(torch.zeros(MEMBERS, 40_000))
    names = ["small", "tiny", "large"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    patterns: dict[tuple[str, ...], int] = {}
    zeros, nonfinite, steps = np.zeros((3, MEMBERS)), np.zeros((3, MEMBERS)), np.zeros(3)
    expected = np.zeros((3, MEMBERS, 512), np.int64)

    def keep(opt, args, kwargs):
        present = tuple(name for name in names if getattr(model, name).grad is not None)
        patterns[present] = patterns.get(present, 0) + 1
        for i, name in enumerate(names):
            if name not in present:
                continue
            grad = getattr(model, name).grad.numpy()
            seen = steps[i]
            steps[i] += 1
            zeros[i] += (grad == 0).sum(1)
            nonfinite[i] += (~np.isfinite(grad)).sum(1)
            if seen % every == 0:
                expected[i] += [numpy_bins(member) for member in grad]

    optimizer.register_step_pre_hook(keep)
    rng = np.random.default_rng(4)
    with GradientMonitor(model, None, members=MEMBERS, histogram_every=every, activations=False,
                         weights=False) as monitor:
        for step in range(27):
            for name, p in model.named_parameters():
                wanted = name == "large" or (name == "tiny" and step % 2 == 0) or (name == "small" and step % 3 != 2)
                p.grad = gradient(rng, tuple(p.shape), step) if wanted else None
            optimizer.step()
        gradients = monitor.parts["gradients"]
        gradients.reduce()
        counts = gradients.counts.view(3, MEMBERS, 512).numpy().copy()
        logged = monitor.log(0)
    assert len(patterns) == 4
    for i, name in enumerate(names):
        np.testing.assert_array_equal(counts[i], expected[i], err_msg=name)
        numel = getattr(model, name).shape[1]
        for member in range(MEMBERS):
            row = logged[member][name]
            assert row["zero_fraction"] == pytest.approx(zeros[i, member] / (numel * steps[i]), rel=1e-12), name
            assert row["nonfinite"] == nonfinite[i, member], name
