"""Diagnosis: the entry points (windows, a live monitor, a run directory), the line, report and
JSON forms, TensorBoard output, and a few short real runs, one per verdict class."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.analysis.diagnose import (
    VERDICTS,
    Diagnosis,
    diagnose,
    diagnose_monitor,
    diagnose_run,
    scalars,
    write_to_tensorboard,
)
from gradflow.analysis.rules import VANISHING_RATIO
from gradflow.experiments.recording import MonitorCallback
from recorded_runs import record_run
from synthetic_windows import FALLING, FLAT, history


def test_empty_history_is_an_error():
    with pytest.raises(ValueError, match="monitor.log"):
        diagnose([])


def test_json_form_is_strict_json():
    diagnosis = diagnose(history(sizes=(1e-5, 1e-3, 0.1), zero=0.0), FLAT)
    text = json.dumps(diagnosis.to_dict(), allow_nan=False)      # NaN evidence became null
    data = json.loads(text)
    assert data["verdicts"] == ["vanishing", "stalled"]
    assert data["line"].startswith("Verdict: vanishing, stalled (")
    assert data["evidence"]["layers"]["dense_1"]["ratio_early"] == pytest.approx(1e-4)
    assert data["evidence"]["checks"]["vanishing"]["threshold"] == VANISHING_RATIO
    assert data["recommendation"]


def test_report_has_tables_checks_and_advice():
    report = diagnose(history(saturated=0.9), FALLING).report()
    assert report.splitlines()[0].startswith("Verdict: saturated")
    assert "dense_2" in report and "tanh_1" in report and "90%" in report
    assert "Checks:" in report and "Recommendation:" in report and "Xavier" in report


class FakeWriter:
    def __init__(self):
        self.scalars, self.texts = {}, {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)

    def add_text(self, tag, text, step):
        self.texts[tag] = (text, step)


def test_tensorboard_scalars_and_text():
    diagnosis = diagnose(history(sizes=(1e-5, 1e-3, 0.1)))
    writer = FakeWriter()
    write_to_tensorboard(diagnosis, writer, 19)
    assert writer.scalars["diagnosis/vanishing"] == (1.0, 19)
    assert writer.scalars["diagnosis/healthy"] == (0.0, 19)
    assert {f"diagnosis/{v}" for v in VERDICTS} <= set(writer.scalars)
    assert writer.scalars["diagnosis/vanishing/value"][0] == pytest.approx(1e-4)
    assert writer.scalars["diagnosis/dense_1/ratio_early"][0] == pytest.approx(1e-4)
    text, step = writer.texts["diagnosis"]
    assert step == 19 and "Verdict: vanishing" in text
    assert all(math.isfinite(v) for v, _ in writer.scalars.values())


def test_scalars_of_a_bare_diagnosis():
    assert scalars(Diagnosis(["healthy"], {"checks": {}}))["diagnosis/healthy"] == 1.0


# -- live monitor and run directories ------------------------------------------------------


def test_diagnose_a_live_monitor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 2), torch.randn(64, 1)
    losses = []
    with GradientMonitor(model) as monitor:
        for epoch in range(5):
            for _ in range(4):
                optimizer.zero_grad()
                loss = (model(x) - y).pow(2).mean()
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
            monitor.log(epoch)
        diagnosis = diagnose_monitor(monitor, losses)
    assert diagnosis.evidence["windows"] == 5
    assert list(diagnosis.evidence["layers"]) == ["0", "2"]
    assert "1" in diagnosis.evidence["activations"]
    assert set(diagnosis.verdicts) <= set(VERDICTS)


def test_batched_monitor_needs_a_member():
    windows = []
    for member, sizes in enumerate([(0.1, 0.1, 0.1), (1e-5, 1e-3, 0.1)]):
        for w in history(sizes=sizes):
            w.member = member
            windows.append(w)
    monitor = SimpleNamespace(history=windows)
    with pytest.raises(ValueError, match="member=k"):
        diagnose_monitor(monitor)
    assert diagnose_monitor(monitor, member=0).verdicts == ["healthy"]
    assert diagnose_monitor(monitor, member=1).verdicts == ["vanishing"]


def test_run_directory_matches_its_live_history(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model) as monitor:
        recorder = MonitorCallback(monitor, tmp_path)
        for epoch in range(4):
            for _ in range(3):
                optimizer.zero_grad()
                model(torch.randn(8, 2)).pow(2).mean().backward()
                optimizer.step()
            recorder.epoch_end(epoch, {})
        recorder.close()
    live, recorded = diagnose_monitor(monitor).to_dict(), diagnose_run(tmp_path).to_dict()
    assert recorded["verdicts"] == live["verdicts"]
    assert recorded["evidence"]["layers"].keys() == live["evidence"]["layers"].keys()
    for layer, row in live["evidence"]["layers"].items():
        for key, value in row.items():
            if isinstance(value, float):
                assert recorded["evidence"]["layers"][layer][key] == pytest.approx(value, rel=1e-9), (layer, key)
    assert recorded["evidence"]["activations"] == live["evidence"]["activations"]


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "no such run directory"),
    (lambda p: p, "no gradients.csv"),
], ids=["missing-dir", "no-gradients-csv"])
def test_run_directory_errors(tmp_path, make, message):
    with pytest.raises(FileNotFoundError, match=message):
        diagnose_run(make(tmp_path))


# -- short real runs: one per verdict class ------------------------------------------------

REAL = [
    ("configs/deep_relu.yaml", ["train.epochs=60", "train.seed=1"], {"healthy"}, set()),
    ("configs/deep_tanh.yaml", ["train.epochs=30", "train.seed=3"], {"vanishing", "saturated"}, {"healthy"}),
    ("configs/deep_relu.yaml", ["train.epochs=5", "optimizer.lr=10", "train.on_nonfinite=continue"],
     {"exploding"}, {"healthy"}),
    ("configs/deep_relu_20.yaml", ["train.epochs=60", "train.seed=1"], {"dead-units", "stalled"}, {"healthy"}),
]


@pytest.mark.parametrize("config, overrides, present, absent", REAL,
                         ids=["deep-relu-healthy", "deep-tanh-vanishing", "lr10-exploding", "relu20-dead"])
def test_real_short_runs(tmp_path, config, overrides, present, absent):
    run_dir = record_run(tmp_path / "run", config, overrides)
    diagnosis = diagnose_run(run_dir)
    assert present <= set(diagnosis.verdicts), diagnosis.report()
    assert not absent & set(diagnosis.verdicts), diagnosis.report()
    json.dumps(diagnosis.to_dict(), allow_nan=False)
