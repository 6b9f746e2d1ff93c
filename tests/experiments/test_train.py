"""Trainer: Keras update rules, loss, history semantics, callbacks, determinism."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradflow.experiments.config import Config, OptimizerConfig, TrainConfig
from gradflow.experiments.data import Dataset, load_dataset
from gradflow.experiments.models import build_model
from gradflow.experiments.optimizers import make_optimizer
from gradflow.experiments.train import EpochScalars, fit, train_from_config


def test_sgd_momentum_follows_keras_rule_by_hand():
    # Keras SGD(lr=0.01, momentum=0.9): v = 0.9 v - 0.01 g; w += v.
    torch.manual_seed(0)
    layer = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.rand(8, 1)
    opt = make_optimizer(layer.parameters(), OptimizerConfig())
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    for _ in range(2):
        # gradient by hand at the current weights: d/dz BCE-with-logits = sigmoid(z) - y
        err = (torch.sigmoid(x @ w.T + b) - y) / len(x)
        gw, gb = err.T @ x, err.sum(0)
        vw, vb = 0.9 * vw - 0.01 * gw, 0.9 * vb - 0.01 * gb
        w, b = w + vw, b + vb
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(layer(x), y).backward()
        opt.step()
        torch.testing.assert_close(layer.weight.detach(), w)
        torch.testing.assert_close(layer.bias.detach(), b)


def test_adam_uses_keras_defaults():
    cfg = OptimizerConfig(name="adam", lr=0.001)
    d = make_optimizer([torch.zeros(1, requires_grad=True)], cfg).defaults
    assert (d["lr"], d["betas"], d["eps"]) == (0.001, (0.9, 0.999), 1e-7)


def keras_bce(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-7, 1 - 1e-7)
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()


def test_loss_matches_keras_and_stays_finite_when_saturated():
    z = torch.linspace(-5, 5, 11, dtype=torch.float64).reshape(-1, 1)
    y = (torch.arange(11) % 2).double().reshape(-1, 1)
    torch.testing.assert_close(F.binary_cross_entropy_with_logits(z, y), keras_bce(torch.sigmoid(z), y))
    saturated = torch.tensor([[200.0], [-200.0]])
    assert torch.isfinite(F.binary_cross_entropy_with_logits(saturated, torch.tensor([[0.0], [1.0]])))


def small_run(**train) -> tuple[Config, Dataset]:
    cfg = Config()
    cfg.model.activation, cfg.model.initializer = "relu", "he_uniform"
    cfg.train = replace(cfg.train, **{"epochs": 3, **train})
    return cfg, load_dataset(cfg.data)


def run(cfg: Config, data: Dataset, optimizer: OptimizerConfig | None = None, callbacks=()):
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    return model, fit(model, data, optimizer or cfg.optimizer, cfg.train, callbacks=callbacks)


def test_history_is_keras_style():
    cfg, data = small_run()
    _, result = run(cfg, data)
    assert [row["epoch"] for row in result.history] == [0, 1, 2]
    assert set(result.history[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}
    assert result.epochs_run == 3 and not result.stopped_early
    assert 0 <= result.train_accuracy <= 1 and 0 <= result.test_accuracy <= 1


def test_epoch_metrics_are_batch_size_weighted_means():
    # With lr = 0 the model never changes, so the batch-size-weighted means over the epoch's
    # batches (15 of 32 and one of 20) equal the loss and accuracy over the full training set.
    cfg, data = small_run(epochs=1)
    model, result = run(cfg, data, optimizer=replace(cfg.optimizer, lr=0.0))
    with torch.no_grad():
        logits = model[:-1](data.x_train)
    row = result.history[0]
    assert row["loss"] == pytest.approx(F.binary_cross_entropy_with_logits(logits, data.y_train).item(), rel=1e-5)
    assert row["accuracy"] == pytest.approx(((logits > 0).float() == data.y_train).float().mean().item())
    assert row["accuracy"] == pytest.approx(result.train_accuracy)


def test_validation_and_final_accuracy_are_full_set():
    cfg, data = small_run()
    model, result = run(cfg, data)
    with torch.no_grad():
        logits = model(data.x_test)
    assert result.history[-1]["val_accuracy"] == pytest.approx(((logits > 0.5).float() == data.y_test).float().mean().item())
    assert result.test_accuracy == pytest.approx(result.history[-1]["val_accuracy"])


def test_same_seed_same_run_different_seed_different_run():
    cfg, data = small_run()
    a, b = run(cfg, data)[1].history, run(cfg, data)[1].history
    assert a == b
    cfg.train = replace(cfg.train, seed=1)
    assert run(cfg, data)[1].history != a


class Recorder:
    def __init__(self, model: nn.Module):
        self.model, self.steps, self.epochs, self.weights = model, [], [], []

    def after_backward(self, step: int) -> None:
        self.steps.append(step)
        assert all(p.grad is not None for p in self.model.parameters())
        self.weights.append(self.model.dense_1.weight.detach().clone())

    def epoch_end(self, epoch: int, metrics: dict) -> None:
        self.epochs.append((epoch, sorted(metrics)))


def test_callbacks_fire_after_backward_before_step_and_at_epoch_end():
    cfg, data = small_run(epochs=2)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    initial = model.dense_1.weight.detach().clone()
    rec = Recorder(model)
    fit(model, data, cfg.optimizer, cfg.train, callbacks=[rec])
    assert rec.steps == list(range(32))  # 16 batches per epoch: 15 of 32, one of 20
    assert torch.equal(rec.weights[0], initial)  # step 0 has not been applied yet
    assert not torch.equal(rec.weights[1], rec.weights[0])  # ...and is applied before step 1
    assert rec.epochs == [(e, ["accuracy", "loss", "val_accuracy", "val_loss"]) for e in (0, 1)]


def test_callbacks_with_only_one_method_are_fine():
    class OnlyEpochs:
        seen = 0

        def epoch_end(self, epoch, metrics):
            OnlyEpochs.seen += 1

    cfg, data = small_run(epochs=2)
    run(cfg, data, callbacks=[OnlyEpochs()])
    assert OnlyEpochs.seen == 2


def test_epoch_scalars_tags():
    class FakeWriter:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, step))

    writer = FakeWriter()
    cfg, data = small_run(epochs=2)
    run(cfg, data, callbacks=[EpochScalars(writer)])
    tags = ["epoch/loss", "epoch/accuracy", "epoch/val_loss", "epoch/val_accuracy"]
    assert writer.calls == [(t, e) for e in (0, 1) for t in tags]


def nan_data() -> Dataset:
    data = load_dataset(Config().data)
    x = data.x_train.clone()
    x[0, 0] = math.nan
    return Dataset(x, data.y_train, data.x_test, data.y_test)


@pytest.mark.parametrize(("policy", "epochs_run"), [("stop", 1), ("continue", 3)], ids=["stop", "continue"])
def test_nonfinite_loss_policy(policy, epochs_run):
    cfg, _ = small_run(on_nonfinite=policy)
    _, result = run(cfg, nan_data())
    assert result.epochs_run == epochs_run
    assert result.stopped_early == (policy == "stop")
    if policy == "stop":
        assert result.stop_epoch == 0 and "non-finite" in result.stop_reason


def test_train_from_config_is_seeded():
    cfg = Config(train=TrainConfig(epochs=2, seed=5))
    (m1, r1), (m2, r2) = train_from_config(cfg), train_from_config(cfg)
    assert r1.history == r2.history
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    cfg, data = small_run()
    torch.manual_seed(0)
    result = fit(build_model(cfg.model), data, cfg.optimizer, cfg.train, device="cuda")
    assert result.device.startswith("cuda") and result.epochs_run == 3


def test_a_run_without_a_progress_bar_leaves_no_thread_behind():
    """tqdm starts its monitor thread in __new__ even for a disabled bar, and a disabled bar never
    stops it: a thread that woke every 10 s for the rest of the process and, freeing objects that
    gc.freeze() had frozen, moved test_startup's freeze count. Without a bar, fit makes none."""
    import threading

    import tqdm

    if tqdm.tqdm.monitor is not None:        # one left by a library: stop it, so that a new one shows
        tqdm.tqdm.monitor.exit()
        tqdm.tqdm.monitor = None
    cfg, data = small_run(epochs=2)
    fit(build_model(cfg.model), data, cfg.optimizer, cfg.train, progress=False)
    assert "tqdm_monitor" not in [t.name for t in threading.enumerate()]
