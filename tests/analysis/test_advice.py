"""Advice: plain words per verdict, and by architecture family."""

import pytest

from gradflow.analysis.advice import architecture_family, recommend


@pytest.mark.parametrize("verdicts, words", [
    (["healthy"], "Nothing to fix"),
    (["vanishing", "saturated"], "He initialization"),
    (["exploding"], "learning rate"),
    (["dead-units"], "fewer layers"),
], ids=["healthy", "tanh", "exploding", "dead"])
def test_recommendation_in_plain_words(verdicts, words):
    assert words in recommend(verdicts)


@pytest.mark.parametrize("family, word", [("cnn", "batch normalization"), ("transformer", "warm"),
                                          ("recurrent", "clip"), ("mlp", "He initialization")],
                         ids=["cnn", "transformer", "recurrent", "mlp"])
def test_advice_by_family(family, word):
    assert word in recommend(["vanishing", "exploding"], family)


def test_family_from_layer_kinds_and_names():
    assert architecture_family({"lstm.l0": {"kind": "recurrent"}, "head": {"kind": "weight"}}) == "recurrent"
    assert architecture_family({"h.0.attn.c_attn": {"kind": "weight"}}) == "transformer"
    assert architecture_family({"conv1": {"kind": "weight"}, "fc": {"kind": "weight"}}) == "cnn"
    assert architecture_family({"dense_1": {"kind": "weight"}}) == "mlp"


def test_advice_fits_the_optimizer_and_the_failing_layer():
    assert "Adam" not in recommend(["stalled"], "mlp", "Adam")
    assert "Adam instead of SGD" in recommend(["stalled"], "mlp", "SGD")
    assert "fewer layers" not in recommend(["dead-units"], "cnn", "SGD")
    assert "Pascanu" in recommend(["exploding"], "transformer", "Adam", failing="recurrent")


# -- advice names what the user has: their own loop, or a gradflow train run directory -----


def stalled_lstm():
    """A real monitored LSTM that cannot learn (random targets, a tiny learning rate): stalled,
    recurrent, with gradient-through-time profiles recorded."""
    import torch
    from torch import nn

    from gradflow import GradientMonitor

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = nn.LSTM(3, 8, batch_first=True), nn.Linear(8, 1)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    model, x, y = Net(), torch.randn(32, 20, 3), torch.randn(32, 1)
    optimizer, losses = torch.optim.SGD(model.parameters(), lr=1e-6), []
    with GradientMonitor(model, through_time_every=1) as monitor:
        for epoch in range(6):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            monitor.log(epoch)
    return monitor, losses


def test_advice_in_a_users_loop_names_what_the_user_has(tmp_path):
    from gradflow.analysis.diagnose import diagnose, diagnose_monitor
    from gradflow.analysis.time_plots import plot_through_time

    monitor, losses = stalled_lstm()
    loop = diagnose_monitor(monitor, losses)
    assert "stalled" in loop.verdicts and loop.evidence["family"] == "recurrent", loop.report()
    pointer = "[w.time for w in monitor.history if w.time]"
    assert pointer in loop.recommendation and "plot_through_time" in loop.recommendation
    assert "(through_time.png)" not in loop.recommendation
    assert eval(pointer, {"monitor": monitor})                         # what it points at is there
    assert plot_through_time(monitor.history, tmp_path / "through_time.png").exists()
    run = diagnose(monitor.history, losses, context="run")
    assert "through_time.png" in run.recommendation and "monitor.history" not in run.recommendation


def test_chrono_advice_names_gradflow_config_only_in_a_run():
    import numpy as np

    from gradflow.analysis.diagnose import diagnose
    from gradflow.experiments.models import chrono_bias  # noqa: F401  (what the loop advice names)
    from gradflow.monitor import Window

    grads = {"lstm_1.weight_hh_l0": {"mean_abs": 1e-3, "norm": 1e-2, "max_abs": 1e-2, "nonfinite": 0},
             "dense_2.weight": {"mean_abs": 1e-2, "norm": 1e-1, "max_abs": 1e-1, "nonfinite": 0}}
    windows = [Window(i, 32, gradients=grads, time={"lstm_1.l0": np.logspace(-12, -1, 100)},
                      time_cells={"lstm_1.l0": "LSTM"}) for i in range(12)]
    loop, run = (diagnose(windows, [0.693] * 12, context=c).recommendation for c in ("loop", "run"))
    assert "gradflow.experiments.models.chrono_bias(" in loop and "model.chrono" not in loop
    assert "model.chrono" in run and "chrono_bias" not in run
