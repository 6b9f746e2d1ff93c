"""The window's weight rows (weights.py) against an oracle taken from the parameters themselves."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor


def test_weight_rows_and_update_ratios_match_oracle_window_after_window(reduction_path):
    """Each window's L1, L2 and update ratio (||w - w_start|| / ||w_start||) from clones taken at
    the window's start, over three windows: the start (contiguous, packed in one buffer) is
    renewed in the fused kernel's pass, a channels_last convolution's too (read in logical
    order), and copied after the torch-ops path's; a frozen parameter keeps a ratio of 0."""
    torch.manual_seed(6)
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(16, 32, 3), relu=nn.ReLU(), flat=nn.Flatten(),
                                      dense_1=nn.Linear(32 * 4 * 4, 100), tanh=nn.Tanh(), dense_2=nn.Linear(100, 3)))
    model.conv.weight.data = model.conv.weight.data.contiguous(memory_format=torch.channels_last)
    model.dense_2.bias.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    with GradientMonitor(model, activations=False) as monitor:
        assert monitor.parts["weights"].start[0].is_contiguous()          # packed, whatever the parameter's layout
        for window in range(3):
            start = {name: p.detach().double().clone() for name, p in model.named_parameters()}
            for _ in range(2):
                optimizer.zero_grad()
                model(torch.randn(4, 16, 6, 6)).pow(2).mean().backward()
                optimizer.step()
            monitor.log(window)
            weights = monitor.history[-1].weights
            for name, p in model.named_parameters():
                w, w0 = p.detach().double(), start[name]
                assert weights[name]["l1"] == pytest.approx(w.abs().sum().item(), rel=1e-6), (window, name)
                assert weights[name]["norm"] == pytest.approx(w.norm().item(), rel=1e-6), (window, name)
                ratio = ((w - w0).norm() / w0.norm()).item()
                assert weights[name]["update_ratio"] == pytest.approx(ratio, rel=1e-5, abs=1e-12), (window, name)
            assert weights["dense_2.bias"]["update_ratio"] == 0.0


def test_the_start_copy_is_one_buffer_kept_across_windows(reduction_path):
    """docs/memory.md: one copy of each trainable parameter, all in one buffer, renewed in place
    at each window's end (in the kernel's pass or by copy_), never re-allocated; none of a frozen one."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 2))
    model[2].bias.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    with GradientMonitor(model, activations=False) as monitor:
        weights = monitor.parts["weights"]
        first = [None if s is None else s.data_ptr() for s in weights.start]
        # one allocation for all of them (weights._packed): a mapping per parameter rounds each up to a page
        assert len({s.untyped_storage().data_ptr() for s in weights.start if s is not None}) == 1
        for window in range(3):
            optimizer.zero_grad()
            model(torch.randn(4, 300)).pow(2).mean().backward()
            optimizer.step()
            monitor.log(window)
            assert [None if s is None else s.data_ptr() for s in weights.start] == first, window
            for s, p in zip(weights.start, model.parameters()):
                if s is not None:
                    assert torch.equal(s, p.detach()), window          # the next window starts from now
    assert first[-1] is None                                            # the frozen bias: no copy
