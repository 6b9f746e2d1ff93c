"""The verdict on a run whose loop skips the step on a NaN loss, and its advice about NaNs.

Real monitored runs with a planted NaN: a module that outputs NaN on its 25th training forward
(step 24). The oracle is the plant itself, and an optimizer step pre-hook that checks that every
gradient the optimizer applied was finite (so the gradient counts alone cannot show the NaN).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.analysis.diagnose import diagnose_monitor

PLANTED_STEP = 24     # the 25th forward of the planted module, with 24 optimizer steps behind it


class Bomb(nn.Module):
    """A Linear layer whose output is NaN on its ``at``-th call in training mode."""

    def __init__(self, width: int, at: int) -> None:
        super().__init__()
        self.lin, self.calls, self.at = nn.Linear(width, width), 0, at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.lin(x)
        return y * float("nan") if self.training and self.calls == self.at else y


def skipping_run(nonfinite: bool, skip: str, epochs: int = 6):
    """Train with a NaN planted at step 24; the loop skips the step on a NaN loss, ``skip`` says
    where (``before`` backward or ``after`` it). Returns (monitor, last loss per epoch, every
    step's loss, applied steps)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), Bomb(16, PLANTED_STEP + 1), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(320, 4)
    y = x.sum(1, keepdim=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    applied = []

    def finite_grads(opt, args, kwargs):      # the oracle: what each applied step held
        applied.append(all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None))

    optimizer.register_step_pre_hook(finite_grads)
    epoch_losses, step_losses = [], []
    with GradientMonitor(model, None, nonfinite=nonfinite) as monitor:
        for epoch in range(epochs):
            for i in range(0, 320, 32):
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(x[i:i + 32]), y[i:i + 32])
                step_losses.append(loss.item())
                if skip == "before" and not torch.isfinite(loss):
                    continue
                loss.backward()
                if skip == "after" and not torch.isfinite(loss):
                    continue
                optimizer.step()
            epoch_losses.append(loss.item())
            monitor.log(epoch)
    return monitor, epoch_losses, step_losses, applied


@pytest.mark.parametrize("skip", ["before", "after"], ids=["skip-before-backward", "skip-after-backward"])
def test_a_loop_that_skips_the_step_on_a_nan_loss_gets_exploding(skip):
    monitor, losses, step_losses, applied = skipping_run(True, skip)
    # The oracle: one NaN loss, at the planted step; every step the optimizer applied was finite.
    assert [i for i, v in enumerate(step_losses) if not math.isfinite(v)] == [PLANTED_STEP]
    assert len(applied) == len(step_losses) - 1 and all(applied)
    assert all(math.isfinite(v) for v in losses)
    diagnosis = diagnose_monitor(monitor, losses)
    found = diagnosis.evidence["first_nonfinite"]
    assert (found["module"], found["phase"], found["step"]) == ("2", "forward", PLANTED_STEP)
    assert "exploding" in diagnosis.verdicts, diagnosis.report()
    check = diagnosis.evidence["checks"]["exploding"]
    assert check["fired"] and "all finite" not in check["why"]
    assert f"the first non-finite value came from layer '2' (forward) at step {PLANTED_STEP}" in diagnosis.line()
    assert "1 of 6 windows" in check["why"] and "none in a gradient the optimizer applied" in check["why"]
    assert "  yes exploding: the first non-finite value came from" in diagnosis.report()


def test_without_the_part_the_skipped_step_shows_only_in_the_losses_passed():
    """With nonfinite=False the monitor records nothing of a NaN whose step never came (the
    window is one step short, nothing else): the verdict sees it only in the losses it is given."""
    monitor, losses, step_losses, _ = skipping_run(False, "before")
    assert all(w.first_nonfinite is None for w in monitor.history)
    assert [w.steps for w in monitor.history] == [10, 10, 9, 10, 10, 10]
    assert "exploding" not in diagnose_monitor(monitor, losses).verdicts        # finite epoch losses: unseen
    diagnosis = diagnose_monitor(monitor, step_losses)
    assert "exploding" in diagnosis.verdicts
    assert "1 non-finite losses" in diagnosis.evidence["checks"]["exploding"]["why"]


def nan_run(nonfinite: bool):
    """The same plant, and a loop that steps on regardless: NaN reaches every weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), Bomb(16, PLANTED_STEP + 1), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(320, 4)
    y = x.sum(1, keepdim=True)
    optimizer, losses = torch.optim.SGD(model.parameters(), lr=0.01), []
    with GradientMonitor(model, None, nonfinite=nonfinite) as monitor:
        for epoch in range(6):
            for i in range(0, 320, 32):
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(x[i:i + 32]), y[i:i + 32])
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
            monitor.log(epoch)
    return monitor, losses


HINT = "nonfinite=True"


def test_the_advice_names_nonfinite_true_when_the_part_was_off():
    monitor, losses = nan_run(False)
    diagnosis = diagnose_monitor(monitor, losses)
    assert "exploding" in diagnosis.verdicts and diagnosis.evidence["first_nonfinite"] is None
    assert sum(row["nonfinite"] for row in diagnosis.evidence["layers"].values()) > 0    # the NaN reached the weights
    assert f"GradientMonitor(model, writer, {HINT})" in diagnosis.recommendation, diagnosis.recommendation
    monitor, losses = nan_run(True)
    diagnosis = diagnose_monitor(monitor, losses)
    assert diagnosis.evidence["first_nonfinite"]["step"] == PLANTED_STEP
    assert HINT not in diagnosis.recommendation      # the verdict already names the source


def test_no_nonfinite_hint_on_a_finite_explosion_or_a_healthy_run():
    from synthetic_windows import FALLING, history

    from gradflow.analysis.diagnose import diagnose
    from gradflow.analysis.rules import EXPLODING_UPDATE

    assert HINT not in diagnose(history(update=EXPLODING_UPDATE * 2), FALLING).recommendation
    assert HINT not in diagnose(history(), FALLING).recommendation
    assert HINT in diagnose(history(nonfinite=3), FALLING).recommendation
    # a gradflow run directory whose seeds trained batched (no first-non-finite part there)
    batched = diagnose(history(nonfinite=3), FALLING, context="run", nonfinite_part=False).recommendation
    assert "train.seed=" in batched and HINT not in batched
    assert "train.seed=" not in diagnose(history(nonfinite=3), FALLING, context="run", nonfinite_part=True).recommendation
