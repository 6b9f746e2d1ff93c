"""Break test (brk14b): a NaN that a GradScaler keeps skipping. A weight set to NaN by hand at
step 3 of a float16-autocast run makes every later step's gradient non-finite: the scaler skips
them all and the monitor records the source as the window's first overflow. The oracle is the
plant: dense_3's weight, forward, step 3. The verdict called the run exploding on its NaN losses
without naming that source, and a note called it "an AMP overflow, not a NaN source"."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.analysis.diagnose import diagnose_monitor
from gradflow.monitor.nonfinite import Source

PLANT_STEP = 3


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers = OrderedDict()
    for i in range(1, 5):
        layers[f"dense_{i}"], layers[f"act_{i}"] = nn.Linear(4, 4), nn.Tanh()
    layers["dense_5"] = nn.Linear(4, 1)
    return nn.Sequential(layers)


def _scaled_run(plant: bool, windows: int = 5, steps: int = 4):
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.randn(8, 1)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradientMonitor(model, histograms=False, nonfinite=True) as monitor:
            for window in range(windows):
                for i in range(steps):
                    if plant and window * steps + i == PLANT_STEP:
                        with torch.no_grad():
                            model.dense_3.weight[1, 1] = float("nan")
                    optimizer.zero_grad()
                    with torch.autocast("cpu", dtype=torch.float16):
                        loss = nn.functional.mse_loss(model(x).float(), y)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    losses.append(loss.item())
                monitor.log(window)
    return monitor, losses


def test_a_nan_that_the_scaler_keeps_skipping_is_named_in_the_verdict():
    monitor, losses = _scaled_run(True)
    assert monitor.history[0].first_nonfinite is None           # every step after the plant was skipped
    assert monitor.history[0].first_overflow == Source("dense_3", "forward", PLANT_STEP)
    diagnosis = diagnose_monitor(monitor, losses)
    assert "exploding" in diagnosis.verdicts
    exploding = diagnosis.evidence["checks"]["exploding"]
    assert exploding["why"].startswith(f"the first non-finite value came from dense_3 (forward) at step {PLANT_STEP}")
    assert exploding["source"]["module"] == "dense_3"
    assert f"dense_3 (forward) at step {PLANT_STEP}" in diagnosis.line()
    assert not any("not a NaN source" in note for note in diagnosis.evidence["notes"])


def test_a_clean_scaled_run_keeps_its_overflow_a_note():
    """Nothing planted: any skipped step is the scale calibrating; the verdict names no source."""
    monitor, losses = _scaled_run(False)
    diagnosis = diagnose_monitor(monitor, losses)
    assert "exploding" not in diagnosis.verdicts
    assert diagnosis.evidence["first_nonfinite"] is None
