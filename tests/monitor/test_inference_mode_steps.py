"""``optimizer.step()`` under ``torch.inference_mode()`` (written as a faster ``no_grad``): the
monitor's buffers made during such a step must stay writable outside it, for ``log()`` and
for later steps outside inference mode. 70 steps pass the 64 steps the per-step norms start
with (they grow on the device), and a 70k-element parameter takes the large-gradient path.
Oracle: the gradients' statistics captured just before each step (no pre-hooks here)."""

from __future__ import annotations

import pytest
import torch
from monitor_oracle import GradientOracle, assert_matches_oracle, step_statistics
from torch import nn

from gradflow import GradientMonitor


@pytest.fixture(autouse=True)
def one_thread():
    """140 steps of small tensors: on a loaded machine a second intra-op thread costs 30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MomentsOracle(GradientOracle):
    """The statistics of each step's gradient, without the per-element histogram bins (slow here)."""

    def capture(self) -> None:
        for name, p in self.params.items():
            self.steps[name].append(step_statistics(p.grad))


def test_steps_under_inference_mode_then_outside_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 300), nn.Tanh(), nn.Linear(300, 240), nn.Tanh(), nn.Linear(240, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    oracle = MomentsOracle(model.named_parameters())
    with GradientMonitor(model) as monitor:
        for window in range(2):
            for i in range(70):
                optimizer.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                oracle.capture()
                if i % 35 < 30:                          # most steps inside inference mode, some outside
                    with torch.inference_mode():
                        optimizer.step()
                else:
                    optimizer.step()
            rows = monitor.log(window)
            assert_matches_oracle(rows, oracle, rtol=1e-4)
            oracle.reset()
    assert monitor.history[-1].overall["steps"] == 70


def test_clipping_under_inference_mode_then_outside_it():
    """The first clip call of a window under inference mode: its sums stay writable outside it.
    Oracle: the norms clip_grad_norm_ returned."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    norms = []
    with GradientMonitor(model, activations=False) as monitor:
        for i in range(4):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if i % 2 == 0:
                with torch.inference_mode():
                    norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01).item())
                    optimizer.step()
            else:
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01).item())
                optimizer.step()
        monitor.log(0)
    overall = monitor.history[-1].overall
    assert overall["clip_calls"] == 4 and overall["clipped_steps"] == 4
    assert abs(overall["total_norm_before_clip"] - sum(norms) / 4) < 1e-6 * overall["total_norm_before_clip"]
