"""The Recorder under both framework callbacks, driven by a plain torch loop: windows against an
oracle read from p.grad at each step, losses per window, the verdict written to every output,
remove on finish; and it imports no framework."""

from __future__ import annotations

import subprocess
import sys

import torch
from oracle_tools import grad_row, windows

from gradflow.integrations.recorder import Recorder
from gradflow.monitor import GradientMonitor


def test_a_plain_loop_through_the_recorder_matches_the_oracle(capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reported: list[tuple[dict, int]] = []
    recorder = Recorder(histograms=False, weights=False, activations=False)
    recorder.start(model, writes=True, step=0, reports=[lambda scalars, step: reported.append((scalars, step))])
    records, losses = [], []
    for step in range(1, 6):
        x = torch.randn(16, 4)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        records.append(grad_row(model))
        losses.append(loss.item())
        recorder.record(optimizer)
        optimizer.step()
        recorder.add_loss(loss.detach())
        if recorder.due(step, 2):
            recorder.write(step)
    recorder.finish(5)                    # the last, partial window at step 5, then the verdict
    assert [step for _, step in reported] == [2, 4, 5, 5]
    expected = windows(records, [2, 4, 5])
    for scalars, step in reported[:3]:
        for name in ("0.weight", "2.bias"):
            want = expected[step][name]["norm"]
            assert abs(scalars[f"grad/{name.replace('.', '/')}/norm"] - want) / want < 1e-5
    assert any(k.startswith("diagnosis/") for k in reported[3][0])
    want_losses = [sum(losses[0:2]) / 2, sum(losses[2:4]) / 2, losses[4]]
    assert max(abs(a - b) / b for a, b in zip(recorder.losses, want_losses)) < 1e-6
    assert recorder.steps == 5 and recorder.windows == 3
    assert recorder.diagnosis is not None and "gradflow: Verdict:" in capsys.readouterr().out
    assert not recorder.monitor.attached and GradientMonitor.detach(model) is False


def test_a_rank_that_does_not_write_records_but_prints_and_writes_nothing(capsys):
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reported = []
    recorder = Recorder(histograms=False)
    recorder.start(model, writes=False, step=0, reports=[lambda scalars, step: reported.append(step)])
    model(torch.randn(4, 3)).sum().backward()
    recorder.record(optimizer)
    recorder.finish(1)
    assert recorder.diagnosis is not None and reported == [] and capsys.readouterr().out == ""


def test_the_recorder_imports_no_framework():
    code = ("import sys, gradflow.integrations.recorder; "
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_histogram_every_reaches_the_monitor_and_a_bad_one_is_refused():
    """The callbacks' histogram_every: the recorder's monitor histograms each parameter's 1st,
    (N+1)-th, ... step with a gradient (here its steps 0 and 3 of 5); 0 is a one-line ValueError
    at construction."""
    import pytest

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = Recorder(histogram_every=3, activations=False)
    recorder.start(model, writes=False, step=0, reports=[])
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        recorder.record(optimizer)
        optimizer.step()
    gradients = recorder.monitor.parts["gradients"]
    gradients.reduce()
    assert gradients.counts.view(2, -1).sum(1).tolist() == [2 * 6, 2 * 2]
    recorder.finish(5)
    with pytest.raises(ValueError, match=r"^histogram_every must be a positive int \(1: every step\), got 0$"):
        Recorder(histogram_every=0)
