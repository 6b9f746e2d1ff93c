"""A batched member against the oracle: the same seed trained alone by train.fit.

Member k must start from the solo seed-k weights, see the solo seed-k batches and follow the
solo trajectory within float tolerance; its monitor statistics must be the solo run's.
"""

import json

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.analysis.windows import load_windows
from gradflow.experiments.batched import BatchedLinear, build_batched, fit_batched, member_state, train_members
from gradflow.experiments.config import load_config
from gradflow.experiments.data import load_dataset
from gradflow.experiments.models import build_model
from gradflow.experiments.train import fit

SEEDS = [0, 3, 5]
STEPS = 100  # 500 samples / 32 = 16 steps per epoch: 7 epochs cover them


class Trajectory:
    """Callback: each step's weights and gradients just before the optimizer steps."""

    def __init__(self, model: nn.Module, member: int | None = None) -> None:
        self.model, self.member, self.steps = model, member, []

    def after_backward(self, step: int) -> None:
        self.steps.append({name: (p.detach().clone(), p.grad.detach().clone())
                           for name, p in self.model.named_parameters()})


def solo(cfg, data, seed, recorder=None):
    """The oracle: seed, build and fit exactly as train_from_config does."""
    cfg.train.seed = seed
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    callbacks = [recorder(model)] if recorder else []
    return callbacks, fit(model, data, cfg.optimizer, cfg.train, callbacks=callbacks)


def member_view(tensor: torch.Tensor, k: int, name: str) -> torch.Tensor:
    return tensor[k, 0] if name.endswith("bias") else tensor[k]


def test_batched_linear_is_k_linears():
    layers = [nn.Linear(3, 4) for _ in range(2)]
    batched = BatchedLinear.stack(layers)
    x = torch.randn(2, 6, 3)
    for k, layer in enumerate(layers):
        torch.testing.assert_close(batched(x)[k], layer(x[k]))


@pytest.mark.parametrize("config", ["configs/deep_relu.yaml", "configs/deep_tanh.yaml"], ids=["relu-he", "tanh-uniform"])
def test_member_starts_from_the_solo_weights(config):
    cfg = load_config(config)
    batched = build_batched(cfg.model, SEEDS)
    for k, seed in enumerate(SEEDS):
        torch.manual_seed(seed)
        expected = build_model(cfg.model).state_dict()
        got = member_state(batched, k)
        assert got.keys() == expected.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("config", ["configs/deep_relu.yaml", "configs/deep_tanh_adam.yaml"], ids=["sgd-momentum", "adam"])
def test_member_follows_the_solo_trajectory(config):
    cfg = load_config(config, ["train.epochs=7"])
    data = load_dataset(cfg.data)
    batched = build_batched(cfg.model, SEEDS)
    recorded = Trajectory(batched)
    results = fit_batched(batched, data, cfg.optimizer, cfg.train, SEEDS, callbacks=[recorded])
    assert len(recorded.steps) >= STEPS
    for k, seed in enumerate(SEEDS):
        (alone,), result = solo(cfg, data, seed, Trajectory)
        for step in range(STEPS):
            for name, (weight, grad) in alone.steps[step].items():
                bw, bg = recorded.steps[step][name]
                # float32 rounding differs between addmm and baddbmm; 1e-5 over 100 steps
                torch.testing.assert_close(member_view(bw, k, name), weight, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(member_view(bg, k, name), grad, atol=1e-5, rtol=1e-4)
        assert results[k].history[-1]["loss"] == pytest.approx(result.history[-1]["loss"], abs=1e-4)
        assert results[k].train_accuracy == pytest.approx(result.train_accuracy, abs=0.005)


def test_member_history_is_the_solo_history():
    cfg = load_config("configs/shallow_tanh.yaml", ["train.epochs=3"])
    data = load_dataset(cfg.data)
    results = fit_batched(build_batched(cfg.model, SEEDS), data, cfg.optimizer, cfg.train, SEEDS)
    for k, seed in enumerate(SEEDS):
        _, result = solo(cfg, data, seed)
        for got, want in zip(results[k].history, result.history, strict=True):
            assert got == pytest.approx(want, abs=1e-5)


def _windows(model, data, cfg, seeds=None, epochs=2):
    """Monitor windows (one per epoch) of a solo model or (members) of a batched one."""
    members = len(seeds) if seeds else 1
    with GradientMonitor(model, None, members=members) as monitor:
        logger = type("Log", (), {"epoch_end": lambda self, epoch, metrics: monitor.log(epoch)})()
        if seeds:
            fit_batched(model, data, cfg.optimizer, cfg.train, seeds, callbacks=[logger])
        else:
            fit(model, data, cfg.optimizer, cfg.train, callbacks=[logger])
    return monitor


@pytest.mark.parametrize("config", ["configs/deep_relu.yaml", "configs/deep_tanh.yaml"], ids=["relu", "tanh"])
def test_member_monitor_statistics_equal_solo_statistics(config):
    cfg = load_config(config, ["train.epochs=2"])
    data = load_dataset(cfg.data)
    batched = _windows(build_batched(cfg.model, SEEDS), data, cfg, SEEDS)
    for k, seed in enumerate(SEEDS):
        cfg.train.seed = seed
        torch.manual_seed(seed)
        alone = _windows(build_model(cfg.model), data, cfg)
        mine = batched.member_history(k)
        assert len(mine) == len(alone.history) == 2
        for got, want in zip(mine, alone.history):
            assert got.steps == want.steps and got.gradients.keys() == want.gradients.keys()
            for name, row in want.gradients.items():
                for key in ("mean_abs", "norm", "max_abs", "zero_fraction", "nonfinite", "weight_l1", "weight_norm"):
                    assert got.gradients[name][key] == pytest.approx(row[key], rel=1e-4, abs=1e-7), (name, key)
            assert got.activations.keys() == want.activations.keys()
            for name, row in want.activations.items():
                assert got.activations[name] == pytest.approx(row, rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("seeds", [SEEDS, SEEDS[:1]], ids=["several", "one"])
def test_train_members_writes_a_solo_style_run_directory_per_member(tmp_path, seeds):
    """Also a worker's share of one seed (``--seeds 0-1`` over 2 workers): its verdict too."""
    cfg = load_config("configs/deep_relu.yaml", ["train.epochs=2"])
    dirs = [tmp_path / f"seed{s}" for s in seeds]
    for d in dirs:
        d.mkdir()
    summaries = train_members(cfg, seeds, dirs)
    assert len(summaries) == len(seeds)
    for seed, d, summary in zip(seeds, dirs, summaries):
        names = {p.name for p in d.iterdir()}
        assert {"config.yaml", "history.csv", "summary.json", "accuracy.png", "gradients.csv", "activations.csv"} <= names
        assert any(n.startswith("events.out.tfevents") for n in names)
        assert load_config(d / "config.yaml").train.seed == seed
        saved = json.loads((d / "summary.json").read_text())
        assert saved["seed"] == seed == summary["seed"]
        assert isinstance(saved["verdict"], list) and saved["verdict_line"].startswith("Verdict:")  # as a solo run
        windows = load_windows(d)
        assert len(windows) == 2 and "dense_1.weight" in windows[0].gradients
        assert len((d / "history.csv").read_text().splitlines()) == 1 + 2


def test_a_member_with_a_nonfinite_loss_stops_alone():
    # lr=1e36 overflows shallow tanh: seeds 0 and 5 blow up in epoch 0, seed 3 in epoch 2. Each
    # member must stop where it stops alone, with the solo history and accuracies.
    cfg = load_config("configs/shallow_tanh.yaml", ["train.epochs=4", "optimizer.lr=1.0e+36"])
    data = load_dataset(cfg.data)
    results = fit_batched(build_batched(cfg.model, SEEDS), data, cfg.optimizer, cfg.train, SEEDS)
    assert len({r.stop_epoch for r in results}) > 1  # they do not all stop together
    for k, seed in enumerate(SEEDS):
        _, alone = solo(cfg, data, seed)
        assert (results[k].stopped_early, results[k].stop_epoch) == (alone.stopped_early, alone.stop_epoch)
        assert results[k].epochs_run == alone.epochs_run
        assert results[k].test_accuracy == pytest.approx(alone.test_accuracy, abs=1e-6)
