"""Break tests (brk12a) of the monitor's public API as README.md and docs/monitor.md state it:
``history``/``history_length``, compact old windows, ``names``, ``log()``'s return for members=1
and K, ``histograms=N`` pooling with ``flush()``/``remove()``, the Sink protocol (what each method
receives), ``record()`` by hand, ``detach``, copies of a monitored model, ``with`` and a raising body.
The oracle: the docs, and statistics computed by hand from ``p.grad`` at the step."""

from __future__ import annotations

import copy
import io
import json
import math
import pickle

import pytest
import torch
from torch import nn

from gradflow.monitor import GradientMonitor, MonitorError
from gradflow.monitor.sinks import ScalarSink, Sink, TeeSink
from gradflow.monitor.stats import Histogram


def small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def train_step(model, optimizer) -> dict[str, torch.Tensor]:
    """One step; the gradients it applied, copied (float64)."""
    optimizer.zero_grad()
    (model(torch.randn(4, 2)) ** 2).sum().backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
    optimizer.step()
    return grads


class Recorder(Sink):
    """A user's Sink: keeps what each method was handed."""

    def __init__(self) -> None:
        self.logs, self.texts, self.released = [], [], 0

    def log(self, scalars, histograms, step):
        self.logs.append((scalars, histograms, step))

    def text(self, texts, step):
        self.texts.append((texts, step))

    def release(self):
        self.released += 1


class Failing(Sink):
    def log(self, scalars, histograms, step):
        raise RuntimeError("disk gone")


def test_history_length_setter_refuses_bad_values_and_shrinks_keeping_compact_rows_readable():
    model, optimizer = small()
    monitor = GradientMonitor(model, history_length=5)
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(MonitorError, match="history_length must be a positive int or None"):
            monitor.history_length = bad
    assert monitor.history_length == 5
    grads = []
    for step in range(6):
        grads.append(train_step(model, optimizer))
        monitor.log(step)
    assert [w.step for w in monitor.history] == [1, 2, 3, 4, 5]
    old = monitor.history[0]
    assert type(old.gradients) is not dict                   # compact (read-only) once two windows old
    for w in monitor.history:      # the docs' JSON recipe works on compact and recent windows alike
        for table in (w.gradients, w.weights, w.activations):
            json.loads(json.dumps({name: dict(row) for name, row in table.items()}))
    row, g = old.gradients["0.weight"], grads[1]["0.weight"]
    assert row["mean_abs"] == pytest.approx(float(g.abs().mean()), rel=1e-6)
    assert row["norm"] == pytest.approx(float(g.norm()), rel=1e-6)
    assert row["max_abs"] == pytest.approx(float(g.abs().max()), rel=1e-6)
    assert type(row["steps"]) is int and type(row["nonfinite"]) is int and row == dict(row)
    with pytest.raises(TypeError):
        row["norm"] = 0.0
    monitor.history_length = 2
    assert [w.step for w in monitor.history] == [4, 5]
    monitor.history_length = None
    for step in range(6, 9):
        train_step(model, optimizer)
        monitor.log(step)
    assert [w.step for w in monitor.history] == [4, 5, 6, 7, 8]
    assert [type(w.gradients) is dict for w in monitor.history] == [False, False, False, True, True]
    monitor.history_length = 1
    assert [w.step for w in monitor.history] == [8] and monitor.history[0].gradients["0.bias"]["steps"] == 1
    monitor.remove()


def test_compact_window_keeps_nan_and_counts():
    model = nn.Linear(3, 2)
    nn.init.zeros_(model.bias)                                 # update ratio NaN: started at zero
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradientMonitor(model)
    for step in range(4):
        optimizer.zero_grad()
        model(torch.ones(4, 3)).sum().backward()
        if step == 0:
            model.weight.grad[0, 0] = float("inf")
            model.weight.grad[1, 1] = float("nan")
            with torch.no_grad():
                optimizer.step()
                model.weight.nan_to_num_(0.0, 0.0, 0.0)
        else:
            optimizer.step()
        monitor.log(step)
    first = monitor.history[0]
    assert type(first.gradients) is not dict
    assert first.gradients["weight"]["nonfinite"] == 2 and type(first.gradients["weight"]["nonfinite"]) is int
    assert math.isnan(first.gradients["bias"]["weight_update_ratio"])
    assert first.gradients["bias"]["mean"] == 4.0        # d(sum)/d(bias) = batch size 4
    monitor.remove()


def test_names_log_return_for_one_and_k_members():
    model, optimizer = small()
    monitor = GradientMonitor(model, members=1)
    assert monitor.names == [n for n, _ in model.named_parameters()]
    grads = train_step(model, optimizer)
    rows = monitor.log(0)
    assert type(rows) is dict and list(rows) == monitor.names
    assert rows["2.weight"]["norm"] == pytest.approx(float(grads["2.weight"].norm()), rel=1e-6)
    monitor.remove()

    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4, 2))

        def forward(self, x):
            return torch.bmm(x, self.w)

    stacked = Stacked()
    optimizer = torch.optim.SGD(stacked.parameters(), lr=0.1)
    monitor = GradientMonitor(stacked, members=3)
    optimizer.zero_grad()
    stacked(torch.randn(3, 5, 4)).pow(2).sum().backward()
    g = stacked.w.grad.double().clone()
    optimizer.step()
    rows = monitor.log(0)
    assert type(rows) is list and len(rows) == 3
    for k, row in enumerate(rows):
        assert row["w"]["norm"] == pytest.approx(float(g[k].norm()), rel=1e-6)
        assert row["w"]["mean_abs"] == pytest.approx(float(g[k].abs().mean()), rel=1e-6)
    assert [w.member for w in monitor.history] == [0, 1, 2]
    monitor.remove()


def test_histogram_pool_flush_and_remove_with_user_sink_and_tee():
    model, optimizer = small()
    sink, scalars = Recorder(), []
    monitor = GradientMonitor(model, TeeSink(sink, ScalarSink(lambda s, step: scalars.append(step))), histograms=3)
    for step in range(4):
        train_step(model, optimizer)
        monitor.log(step)
    assert scalars == [0, 1, 2, 3]                                  # scalars every window
    assert [len(h) > 0 for _, h, _ in sink.logs] == [False, False, True, False]
    pooled = sink.logs[2][1]
    assert pooled["grad/0/weight"].num == 30        # 3 windows x 1 histogrammed step x 10 values
    for scalar_map, histograms, step in sink.logs:   # the protocol's types (sinks.Sink.log)
        assert type(step) is int and all(type(k) is str for k in scalar_map)
        assert all(type(v) in (float, int) for v in scalar_map.values())
        assert all(isinstance(h, Histogram) for h in histograms.values())
    monitor.flush()
    assert sink.logs[-1][0] == {} and sink.logs[-1][2] == 3 and sink.logs[-1][1]["grad/0/weight"].num == 10
    count = len(sink.logs)
    monitor.flush()                                  # nothing pooling: nothing written
    assert len(sink.logs) == count
    train_step(model, optimizer)
    monitor.log(4)
    monitor.remove()
    assert [s for _, h, s in sink.logs[count:] if h] == [4] and sink.released == 1
    monitor.remove()                                 # safe twice
    assert len(sink.logs) == count + 2


def idle_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1), nn.Linear(1, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_sink_text_gets_str_tags_and_int_step():
    model, optimizer = idle_model()
    sink = Recorder()
    monitor = GradientMonitor(model, sink)
    optimizer.zero_grad()
    model[:3](torch.randn(4, 2)).sum().backward()        # the last Linear gets no gradient: idle
    optimizer.step()
    monitor.log(0)
    assert monitor.history[-1].idle == ["3.weight", "3.bias"]
    [(texts, step)] = sink.texts
    assert step == 0 and "3.weight" in texts["grad/idle_parameters"]
    monitor.remove()


def test_failing_sink_in_tee_leaves_the_others_the_whole_window_texts_included():
    """docs/monitor.md: a sink that raises makes log() raise 'after every other sink got the window'."""
    model, optimizer = idle_model()
    sink = Recorder()
    monitor = GradientMonitor(model, TeeSink(Failing(), sink))
    optimizer.zero_grad()
    model[:3](torch.randn(4, 2)).sum().backward()
    optimizer.step()
    with pytest.raises(MonitorError, match="Failing raised RuntimeError: disk gone"):
        monitor.log(0)
    assert len(sink.logs) == 1 and len(monitor.history) == 1
    assert [step for _, step in sink.texts] == [0]             # the idle parameters' text too
    monitor.remove()


def test_record_by_hand_with_automatic_false():
    model, optimizer = small()
    monitor = GradientMonitor(model, automatic=False)
    train_step(model, optimizer)
    with pytest.warns(UserWarning, match="no optimizer step was recorded"):
        assert monitor.log(0) == {}                    # steps, but no record(): nothing recorded
    optimizer.zero_grad()
    (model(torch.randn(4, 2)) ** 2).sum().backward()
    g = model[0].weight.grad.double().clone()
    monitor.record(optimizer)
    optimizer.step()
    rows = monitor.log(1)
    assert rows["0.weight"]["steps"] == 1 and rows["0.weight"]["norm"] == pytest.approx(float(g.norm()), rel=1e-6)
    # the same gradients recorded twice are one step (record()'s docstring)
    optimizer.zero_grad()
    (model(torch.randn(4, 2)) ** 2).sum().backward()
    monitor.record()
    monitor.record()
    assert monitor.log(2)["0.bias"]["steps"] == 1
    head = torch.optim.SGD(model[2].parameters(), lr=0.1)      # record(optimizer): its parameters only
    optimizer.zero_grad()
    (model(torch.randn(4, 2)) ** 2).sum().backward()
    with pytest.warns(UserWarning, match="0.weight, 0.bias had gradients"):
        assert sorted(monitor.record(head) or monitor.log(3)) == ["2.bias", "2.weight"]
    monitor.remove()


def test_detach_and_bad_input():
    model, optimizer = small()
    monitor = GradientMonitor(model)
    assert GradientMonitor.detach(model) is True and GradientMonitor.detach(model) is False
    assert not monitor.attached
    GradientMonitor(model).remove()                        # attachable again
    for bad in (None, 3, "model"):
        with pytest.raises(MonitorError, match="detach.*nn.Module"):
            GradientMonitor.detach(bad)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save", "pickle"])
def test_copies_of_a_monitored_model_are_not_monitored(how):
    model, optimizer = small()
    monitor = GradientMonitor(model)
    grads = train_step(model, optimizer)
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    train_step(twin, twin_optimizer)
    train_step(twin, twin_optimizer)
    assert GradientMonitor.detach(twin) is False
    rows = monitor.log(0)                       # the twin's steps are not in the original's window
    assert rows["0.weight"]["steps"] == 1
    assert rows["0.weight"]["norm"] == pytest.approx(float(grads["0.weight"].norm()), rel=1e-6)
    GradientMonitor(twin).remove()
    monitor.remove()


def test_with_block_that_raises_removes_hooks_and_keeps_the_window():
    model, optimizer = small()
    with pytest.raises(KeyError, match="boom"), GradientMonitor(model) as monitor:
        grads = train_step(model, optimizer)
        raise KeyError("boom")
    assert not monitor.attached and GradientMonitor.detach(model) is False
    train_step(model, optimizer)                            # not recorded: the hooks are gone
    rows = monitor.log(0)
    assert rows["0.weight"]["steps"] == 1
    assert rows["0.weight"]["norm"] == pytest.approx(float(grads["0.weight"].norm()), rel=1e-6)
