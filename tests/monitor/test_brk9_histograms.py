"""Break tests of the kernel's histograms written as they lie (histograms.BuiltHistograms,
event_encoding.HistogramEncoder._encode_built, output._given).

Oracles: TensorBoard's protobuf classes (upb's ``SerializeToString`` of the same histograms made as
objects), the dicts a twin monitor of an identical model hands a plain ``Sink`` (the dict path),
and TensorBoard's own reader of the files written.
"""

import copy
import random

import numpy as np
import pytest
import torch
from test_event_encoding import Recorder, _number, _oracle, _summary_events, _tag
from test_thread_races import _run_together
from torch import nn

from gradflow import GradientMonitor
from gradflow.monitor.event_encoding import SummaryEncoder, event_bytes
from gradflow.monitor.histograms import BuiltHistograms
from gradflow.monitor.sinks import TensorBoardSink
from gradflow.monitor.stats import BuiltRows, Histogram, drawn_buckets


class _Net(nn.Module):
    """Linear, Tanh, Linear, Sigmoid, Linear (linear histograms of the two bounded activations),
    and ``extra``, a parameter outside the forward pass that ``_twin_run``'s loss gives
    non-finite gradients now and then (so that its weights turn NaN, rows with no finite
    value, while the layers' gradients stay finite)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8), nn.Sigmoid(), nn.Linear(8, 1))
        self.extra = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.body(x)


def _twin_run(writer, windows, steps=4, **options):
    """A seeded ``_Net`` monitored writing to ``writer``, and an identical one whose monitor
    writes to a ``Recorder`` (the dicts a user's sink gets), trained on the same batches; at
    every fifth step ``extra``'s gradients are NaN and inf (its weights are from then on). Returns the recorder's windows."""
    torch.manual_seed(0)
    models = [_Net()]
    models.append(copy.deepcopy(models[0]))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    generator = torch.Generator().manual_seed(1)
    recorder = Recorder()
    monitors = [GradientMonitor(models[0], writer, **options), GradientMonitor(models[1], recorder, **options)]
    for window in range(windows):
        for step in range(steps):
            x, y = torch.randn(16, 4, generator=generator), torch.randn(16, 1, generator=generator)
            scale = torch.ones(8)
            if (window * steps + step) % 5 == 4:
                scale[:4], scale[4:] = float("nan"), float("inf")
            for model, optimizer in zip(models, optimizers):
                optimizer.zero_grad()
                (torch.nn.functional.mse_loss(model(x), y) + (model.extra * scale).sum()).backward()
                optimizer.step()
        for monitor in monitors:
            monitor.log(window)
    for monitor in monitors:
        monitor.remove()
    return recorder.windows


class _DroppingSink(TensorBoardSink):
    """A user's TensorBoard sink that leaves out the bias histograms, editing what it is handed
    in place before writing it, as a dict of the ``Sink`` protocol allows."""

    def __init__(self, writer):
        super().__init__(writer)
        self.kinds = []

    def log(self, scalars, histograms, step):
        self.kinds.append(type(histograms))
        for tag in [tag for tag in histograms if tag.endswith("/bias")]:
            del histograms[tag]
        super().log(scalars, histograms, step)


def test_a_user_subclass_of_tensorboardsink_that_overrides_log_is_handed_dicts(tmp_path):
    """The ``Sink`` protocol hands ``log`` a dict; a subclass of ``TensorBoardSink`` that
    overrides ``log`` is a user's sink and gets one (it was handed the read-only
    ``BuiltHistograms``: ``del`` raised and every window's write failed). Its file is what upb
    serializes of the dict it passed on. So is one whose ``log`` is a mixin's; a subclass that
    does not override ``log``, or says it takes them, still gets the kernel's rows; a ``log``
    put on the instance gets dicts."""
    from torch.utils.tensorboard import SummaryWriter

    class Untouched(TensorBoardSink):
        pass

    class Filtering:                              # a mixin's log(), before TensorBoardSink's
        def log(self, scalars, histograms, step):
            histograms.pop("grad/extra", None)
            super().log(scalars, histograms, step)

    class Mixed(Filtering, TensorBoardSink):
        pass

    class Opted(_DroppingSink):                    # says it takes them
        built_histograms = True

    class Below(Untouched):
        pass

    with SummaryWriter(tmp_path) as writer:
        sink = _DroppingSink(writer)
        windows = _twin_run(sink, windows=2, histogram_every=1)
    assert sink.kinds == [dict, dict]
    events = _summary_events(tmp_path)
    assert len(events) == 2
    for (record, event), (scalars, histograms, step) in zip(events, windows):
        kept = {tag: h for tag, h in histograms.items() if not tag.endswith("/bias")}
        assert len(kept) < len(histograms)
        assert record == _oracle(event.wall_time, step, scalars, kept)
    replaced = TensorBoardSink(writer)
    replaced.log = lambda scalars, histograms, step: None          # a log put on the instance: a user's
    assert all(kind(writer).built_histograms for kind in (TensorBoardSink, Untouched, Below, Opted))
    assert not any(sink.built_histograms for sink in (_DroppingSink(writer), Mixed(writer), replaced))


@pytest.mark.parametrize("histograms", [1, 3], ids=["every-window", "pooled-3-flushed-partial"])
def test_runs_with_bounded_activations_and_nonfinite_gradients_write_what_upb_serializes(tmp_path, histograms):
    """A SummaryWriter handed the kernel's rows (and the tanh's and sigmoid's linear histograms
    in ``extra``), every window or pooled over three with the last two flushed at remove(), with
    NaN and inf gradients counted (``nonfinite``): each record is byte for byte upb's event of the
    dicts a twin monitor's plain sink got (no histogram lost, doubled or moved), a row of no
    finite value (``extra``'s weights, NaN) left out."""
    from torch.utils.tensorboard import SummaryWriter

    seen = []

    class Seeing(TensorBoardSink):
        built_histograms = True                  # takes the kernel's rows: records their kind, then writes them

        def log(self, scalars, histograms, step):
            seen.append(type(histograms))
            super().log(scalars, histograms, step)

    with SummaryWriter(tmp_path) as writer:
        windows = _twin_run(Seeing(writer), windows=5, nonfinite=True, histograms=histograms, histogram_every=1,
                            activations_every=1)
    assert BuiltHistograms in seen
    events = _summary_events(tmp_path)
    assert len(events) == len(windows) == 5 + (histograms > 1)       # pooled: the flush's own event
    for (record, event), (scalars, drawn, step) in zip(events, windows):
        assert record == _oracle(event.wall_time, step, scalars, drawn)
    drawn = [drawn for _, drawn, _ in windows if drawn]
    assert len(drawn) >= 2 and all(any(tag.startswith("activation/") for tag in tags) for tags in drawn)
    assert "grad/extra" in drawn[-1] and "weight/extra" not in drawn[-1]     # its NaN weights: no histogram


def test_a_writer_without_the_batched_path_gets_each_histogram_of_the_kernels_rows(tmp_path):
    """A writer-like object (``add_scalar``, ``add_histogram_raw``, no ``_get_file_writer``) is
    written one call at a time from the ``BuiltHistograms``: TensorBoard reads back each
    histogram of the dict path, its five numbers and sparse buckets."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    class OneByOne:
        def __init__(self, writer):
            self.writer = writer

        def add_scalar(self, *args):
            self.writer.add_scalar(*args)

        def add_histogram_raw(self, *args):
            self.writer.add_histogram_raw(*args)

    with SummaryWriter(tmp_path) as writer:
        windows = _twin_run(OneByOne(writer), windows=2, histogram_every=1)
    read = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    assert sorted(read.Tags()["histograms"]) == sorted({tag for _, drawn, _ in windows for tag in drawn})
    for _, drawn, step in windows:
        for tag, h in drawn.items():
            (point,) = [p for p in read.Histograms(tag) if p.step == step]
            value = point.histogram_value
            assert (value.min, value.max, value.num, value.sum, value.sum_squares) == \
                (h.min, h.max, h.num, h.sum, h.sum_squares)
            assert (list(value.bucket_limit), list(value.bucket)) == tuple(drawn_buckets(h))


def test_monitors_in_several_threads_through_one_sink_write_each_window_whole(tmp_path):
    """Three monitors (models of different widths: different rows and tags) in three threads,
    one TensorBoardSink: its encoder's tag cache switches between them under its lock; each
    record is upb's event of that model's twin's dicts."""
    from torch.utils.tensorboard import SummaryWriter

    windows = {}

    def train(k, sink, recorder):
        torch.manual_seed(k)
        models = [nn.Sequential(nn.Linear(4, 4 + k), nn.Tanh(), nn.Linear(4 + k, 1))]
        models.append(copy.deepcopy(models[0]))
        monitors = [GradientMonitor(models[0], sink, histogram_every=1), GradientMonitor(models[1], recorder,
                                                                                         histogram_every=1)]
        optimizers = [torch.optim.SGD(model.parameters(), lr=0.1) for model in models]
        generator = torch.Generator().manual_seed(k)
        for window in range(6):
            x = torch.randn(8, 4, generator=generator)
            for model, optimizer in zip(models, optimizers):
                optimizer.zero_grad()
                model(x).square().mean().backward()
                optimizer.step()
            for monitor in monitors:
                monitor.log(100 * k + window)
        for monitor in monitors:
            monitor.remove()

    with SummaryWriter(tmp_path) as writer:
        sink = TensorBoardSink(writer)
        recorders = [Recorder() for _ in range(3)]
        _run_together(*[(train, (k, sink, recorders[k])) for k in range(3)], switch=1e-4)
    for recorder in recorders:
        windows.update({step: (scalars, drawn) for scalars, drawn, step in recorder.windows})
    events = _summary_events(tmp_path)
    assert sorted(event.step for _, event in events) == sorted(windows) and len(windows) == 18
    for record, event in events:
        assert record == _oracle(event.wall_time, event.step, *windows[event.step])
    assert all(any(tag.startswith("grad/") for tag in drawn) for _, drawn in windows.values())


def test_random_built_rows_are_encoded_as_upb_serializes_them():
    """Rows made by hand, 120 windows through one encoder: five numbers from the special list
    (+-0.0, NaN payloads, +-inf, subnormal, beyond float32) or random, 0 to 2048 buckets of
    such numbers, rows not valid, one to many chunks (buffers with room left over), tags empty,
    long (varint boundaries) or 2- to 4-byte UTF-8, a linear histogram in ``extra``: the bytes
    are upb's and the dict path's."""
    rng = random.Random(9)
    encoder = SummaryEncoder()
    for window in range(120):
        rows, used = rng.randint(1, 10), set()
        tags = ["" if rng.random() < 0.05 and "" not in used and not used.add("") else _tag(rng, used)
                for _ in range(rows)]
        moments = np.array([[_number(rng) if rng.random() < 0.5 else rng.uniform(-5, 5) for _ in range(5)]
                            for _ in range(rows)], dtype=np.float64)
        valid = np.array([rng.random() < 0.85 for _ in range(rows)])
        chunks, start = [], 0
        while start < rows:
            stop = rng.randint(start + 1, rows)
            ends = np.cumsum([0] + [rng.choice([0, 1, 2, 16, 17, 64, 65, 300, 2048]) for _ in range(start, stop)])
            room = int(ends[-1]) + rng.randint(0, 9)
            limits, counts = (np.array([_number(rng) for _ in range(room)], dtype=np.float64) for _ in range(2))
            chunks.append((start, stop, ends.astype(np.int64), limits, counts))
            start = stop
        extra = {_tag(rng, used): Histogram([1.0, 2.0, 3.0], [0.0, 0.0, 4.0], 0.5, 3.0, 4.0, 10.0, 26.0)} \
            if rng.random() < 0.5 else {}
        scalars = {_tag(rng, used): 0.5} if window % 2 else {}
        data = encoder.encode(scalars, BuiltHistograms(tags, BuiltRows(moments, valid, chunks), extra))
        made = BuiltHistograms(tags, BuiltRows(moments, valid, chunks), extra).as_dict()
        assert event_bytes(0.0, 0, data) == _oracle(0.0, 0, scalars, made), window
        assert data == SummaryEncoder().encode(scalars, made), window

