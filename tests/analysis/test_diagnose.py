"""Diagnosis: the entry points (windows, a live monitor, a run directory), the line, report and
JSON forms, TensorBoard output, and a few short real runs, one per verdict class."""

import json
from types import SimpleNamespace

import pytest
import torch
from recorded_runs import record_run
from synthetic_windows import FALLING, FLAT, history
from torch import nn

from gradflow import GradientMonitor
from gradflow.analysis.diagnose import (
    TENSORBOARD_TAG,
    VERDICTS,
    Diagnosis,
    diagnose,
    diagnose_monitor,
    diagnose_run,
    markdown,
    write_to_tensorboard,
)
from gradflow.analysis.rules import VANISHING_RATIO
from gradflow.experiments.recording import MonitorCallback


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
    report = diagnose(history(saturated=0.9), FLAT).report()
    assert report.splitlines()[0].startswith("Verdict: saturated")
    assert "dense_2" in report and "tanh_1" in report and "90%" in report
    assert "Checks:" in report and "Recommendation:" in report and "Xavier" in report


def test_print_shows_the_report_and_repr_the_fields():
    d = diagnose(history(saturated=0.9), FALLING)
    assert str(d) == d.report()
    assert repr(d).startswith("Diagnosis(verdicts=")


class FakeWriter:
    def __init__(self):
        self.scalars, self.texts = {}, {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)

    def add_text(self, tag, text, step):
        self.texts[tag] = (text, step)


def test_tensorboard_gets_the_diagnosis_as_markdown_text_and_no_scalars():
    diagnosis = diagnose(history(sizes=(1e-5, 1e-3, 0.1), saturated=0.9), FLAT)
    writer = FakeWriter()
    write_to_tensorboard(diagnosis, writer, 19)
    assert writer.scalars == {}
    assert TENSORBOARD_TAG == "diagnosis/text_summary" and list(writer.texts) == ["diagnosis"]
    text, step = writer.texts["diagnosis"]
    assert step == 19 and text.startswith("**Verdict: vanishing, saturated, stalled**")
    for name, check in diagnosis.evidence["checks"].items():     # every reason in full
        assert check["why"].replace("|", "\\|") in text, name
    assert "| dense_1 | hidden |" in text and "| tanh_1 | 90% | - |" in text
    assert text.rstrip().endswith(diagnosis.recommendation)


def test_event_file_holds_one_diagnosis_text_with_the_full_verdict_line(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    diagnosis = diagnose(history(sizes=(1e-5, 1e-3, 0.1), saturated=0.9), FLAT)
    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_scalar("epoch/loss", 0.7, 19)
        write_to_tensorboard(diagnosis, writer, 19)
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    assert events.Tags()["scalars"] == ["epoch/loss"]                # no diagnosis/* charts
    assert events.Tags()["tensors"] == [TENSORBOARD_TAG]
    (event,) = events.Tensors(TENSORBOARD_TAG)
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 19 and text == markdown(diagnosis)
    assert "**Verdict: vanishing, saturated, stalled**" in text and "Advice:" in text


def test_markdown_of_a_bare_diagnosis():
    assert markdown(Diagnosis(["healthy"], {"checks": {}}, "Nothing to fix.")).endswith("**Advice:** Nothing to fix.")


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


# -- output-mismatch on a live monitor, and checks that could not be made ------------------


def mismatched_run():
    """A model ending in ReLU trained under BCELoss (probabilities expected): a known mismatch."""
    torch.manual_seed(0)
    x = torch.randn(256, 2)
    y = (x[:, :1] > 0).float()
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1), nn.ReLU())
    loss_fn, optimizer, losses = nn.BCELoss(), torch.optim.SGD(model.parameters(), lr=0.05), []
    with GradientMonitor(model) as monitor:
        for epoch in range(8):
            optimizer.zero_grad()
            loss = loss_fn(model(x).clamp(1e-6, 1 - 1e-6), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            monitor.log(epoch)
    return monitor, model, loss_fn, losses


def check_line(diagnosis, name):
    return next(line for line in diagnosis.report().splitlines() if line.split()[1:2] == [f"{name}:"])


def test_output_mismatch_is_checked_with_what_its_message_asks_for():
    monitor, model, loss_fn, losses = mismatched_run()
    told = {}
    for given in ({}, {"model": model}, {"loss_fn": loss_fn}):
        diagnosis = diagnose_monitor(monitor, losses, **given)
        line = check_line(diagnosis, "output-mismatch")
        assert line.startswith("  n/a output-mismatch: not checked: "), line
        assert "output-mismatch" not in diagnosis.verdicts
        told[tuple(given)] = {key for key in ("model", "loss_fn") if f"{key}=" in line}
        assert "diagnose_monitor" in line
    assert told == {(): {"model", "loss_fn"}, ("model",): {"loss_fn"}, ("loss_fn",): {"model"}}
    run = check_line(diagnose(monitor.history, losses, context="run"), "output-mismatch")   # gradflow train's
    assert run.startswith("  n/a output-mismatch: not checked: gradflow train's models end in a sigmoid") and "=" not in run
    diagnosis = diagnose_monitor(monitor, losses, model=model, loss_fn=loss_fn)   # the names it gave work
    assert "output-mismatch" in diagnosis.verdicts
    assert check_line(diagnosis, "output-mismatch").startswith("  yes output-mismatch: BCELoss expects probabilities "
                                                               "but the model ends in ReLU")


def test_checks_that_could_not_be_made_say_so():
    diagnosis = diagnose(history(sizes=(0.1, 0.1, 0.1)))         # no losses, no activations, no model
    marks = {line.split()[1].rstrip(":"): line.split()[0] for line in diagnosis.report().split("Checks:")[1]
             .split("Recommendation:")[0].strip().splitlines()}
    assert marks["stalled"] == marks["oscillating"] == marks["output-mismatch"] == "n/a"
    assert marks["vanishing"] == marks["exploding"] == marks["insufficient"] == "no"
    assert not diagnosis.evidence["checks"]["stalled"]["checked"]
    assert diagnosis.evidence["checks"]["vanishing"]["checked"]
    assert "- n/a stalled: no loss history to judge" in markdown(diagnosis)


# -- the losses given to diagnose ----------------------------------------------------------


def small_run(epochs=6):
    """A real monitored run; returns the monitor and each epoch's loss tensor (still requiring grad)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer, x, y, losses = torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(64, 2), torch.randn(64, 1), []
    with GradientMonitor(model) as monitor:
        for epoch in range(epochs):
            optimizer.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            optimizer.step()
            losses.append(loss)
            monitor.log(epoch)
    return monitor, losses


def test_losses_as_tensors_read_as_their_floats():
    monitor, tensors = small_run()
    floats = [t.item() for t in tensors]
    expected = diagnose_monitor(monitor, floats).to_dict()
    assert all(t.requires_grad for t in tensors)
    for given in (tensors, torch.stack([t.detach() for t in tensors]), tuple(floats)):
        assert diagnose_monitor(monitor, given).to_dict() == expected


@pytest.mark.parametrize("losses, message", [
    ("0.5 0.4", "losses must be a sequence of numbers.* got str '0.5 0.4'"),
    (0.5, "losses must be a sequence of numbers.* got float"),
    ([0.5, None, 0.3], r"losses\[1\] is None"),
    ([0.5, "0.4"], r"losses\[1\] is str"),
    ([0.5, torch.ones(2)], r"losses\[1\] is a tensor of 2 elements"),
], ids=["string", "scalar", "none-inside", "string-inside", "tensor-of-two"])
def test_bad_losses_are_one_line_naming_losses(losses, message):
    monitor, _ = small_run()
    with pytest.raises(ValueError, match=message) as error:
        diagnose_monitor(monitor, losses)
    assert "\n" not in str(error.value) and "one per epoch, window or step" in str(error.value)


def test_losses_of_another_length_than_the_windows_are_a_series_over_the_run():
    """Documented: one loss per epoch, window or step, read in order as a series over the run."""
    monitor, tensors = small_run()
    per_step = [t.item() for t in tensors for _ in range(4)]      # 24 values for 6 windows
    assert diagnose_monitor(monitor, per_step).evidence["loss"]["first"] == tensors[0].item()
    assert diagnose_monitor(monitor, per_step[:2]).evidence["loss"] is not None
