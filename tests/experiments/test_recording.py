"""Windows written to the run directory's tables read back as the monitor had them."""

import csv
import math

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.analysis.windows import load_windows
from gradflow.experiments.recording import MonitorCallback


def test_tables_round_trip_every_window(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model) as monitor:
        recorder = MonitorCallback(monitor, tmp_path)
        for epoch in range(3):
            for _ in range(4):
                optimizer.zero_grad()
                model(torch.randn(8, 2)).pow(2).mean().backward()
                optimizer.step()
            recorder.epoch_end(epoch, {})
        recorder.close()
    loaded = load_windows(tmp_path)
    assert [w.step for w in loaded] == [0, 1, 2] and [w.steps for w in loaded] == [4, 4, 4]
    for saved, read in zip(monitor.history, loaded):
        assert list(read.gradients) == list(saved.gradients)          # input layer first
        for name, row in saved.gradients.items():
            for key, value in row.items():
                if isinstance(value, float) and math.isnan(value):
                    assert math.isnan(read.gradients[name][key])
                else:
                    assert read.gradients[name][key] == pytest.approx(value, rel=1e-12), (name, key)
        assert read.activations.keys() == saved.activations.keys()
        for name, row in saved.activations.items():
            assert read.activations[name] == pytest.approx(row, rel=1e-12)


def test_window_every_n_steps(tmp_path):
    model = nn.Sequential(nn.Linear(2, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model) as monitor:
        recorder = MonitorCallback(monitor, None, window_steps=5)
        for step in range(12):
            optimizer.zero_grad()
            model(torch.randn(3, 2)).sum().backward()
            recorder.after_backward(step)
            optimizer.step()
            recorder.epoch_end(0, {})                                   # ignored with window_steps
    assert [(w.step, w.steps) for w in monitor.history] == [(5, 5), (10, 5)]


def test_gradients_csv_rows_follow_the_forward_order(tmp_path):
    """A model that defines its head first: the table lists the input side first, so that
    diagnose_run (no model at hand) reads layers input to output, as the live monitor does."""
    from gradflow.analysis.diagnose import diagnose_monitor, diagnose_run

    class HeadFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 1)
            self.body = torch.nn.Linear(2, 4)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    torch.manual_seed(0)
    model = HeadFirst()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model) as monitor:
        recorder = MonitorCallback(monitor, tmp_path)
        for epoch in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, 2)).pow(2).mean().backward()
            optimizer.step()
            recorder.epoch_end(epoch, {})
        recorder.close()
        live = diagnose_monitor(monitor)
    with open(tmp_path / "gradients.csv", newline="") as f:
        names = [row["parameter"] for row in csv.DictReader(f) if row["window"] == "0"]
    assert names == ["body.weight", "body.bias", "head.weight", "head.bias"]
    assert list(diagnose_run(tmp_path).evidence["layers"]) == list(live.evidence["layers"]) == ["body", "head"]


def test_the_first_window_gets_a_histogram_of_its_own_then_pools_keep_their_boundaries():
    """histograms=25: written after windows 0, 24, 49, ... (epochs 0, 1-24, 25-49, ...); a resumed
    run (its first window 50) keeps the same boundaries; True/False/0 leave the monitor alone."""
    from gradflow.experiments.recording import _first_or_pool_end

    assert [i for i in range(100) if _first_or_pool_end(i, 25)] == [0, 24, 49, 74, 99]
    assert [i for i in range(50, 100) if _first_or_pool_end(i, 25)] == [74, 99]
    assert not any(_first_or_pool_end(i, h) for i in range(30) for h in (True, False, 0))
