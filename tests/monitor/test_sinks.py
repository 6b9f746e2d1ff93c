"""The TensorBoard sink: fast checksums identical to TensorBoard's own, one event per window."""

import os

import pytest

from gradflow.monitor.sinks import Histogram, TensorBoardSink, _masked_crc32c


@pytest.mark.parametrize("size", [0, 1, 7, 100, 65_537], ids=["empty", "byte", "odd", "small", "large"])
def test_fast_checksum_equals_tensorboards_pure_python_one(size):
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data = os.urandom(size)
    assert _masked_crc32c(data) == masked_crc32c(data)


def test_one_window_is_one_readable_event(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path) as writer:
        sink = TensorBoardSink(writer)
        histogram = Histogram(limits=[0.5, 1.0], counts=[0.0, 3.0], min=0.5, max=1.0, num=3.0, sum=2.25, sum_squares=1.7)
        sink.log({"grad/dense_1/weight/norm": 0.25, "grad/dense_1/weight/max_abs": 0.5},
                 {"grad/dense_1/weight": histogram}, step=7)
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    assert [e.value for e in events.Scalars("grad/dense_1/weight/norm")] == [0.25]
    (point,) = events.Histograms("grad/dense_1/weight")
    assert point.step == 7 and point.histogram_value.num == 3.0


def test_windows_whose_tags_and_buckets_change_read_back_exactly(tmp_path):
    """The sink refills one event while a window's tags stay the same: every window still reads
    back as written (oracle: the values passed in), a histogram with fewer buckets than the
    previous window's keeps none of them, and a window with other tags gets its own event."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    def histogram(limits, counts):
        return Histogram(limits=limits, counts=counts, min=limits[0] - 1, max=limits[-1], num=sum(counts),
                         sum=float(len(limits)), sum_squares=2.0 * len(limits))

    windows = [
        ({"a/norm": 0.25, "a/max": 0.5}, {"a": histogram([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])}),
        ({"a/norm": 0.75, "a/max": 1.5}, {"a": histogram([8.0], [5.0])}),                 # fewer buckets
        ({"a/norm": 1.25, "b/norm": 9.0}, {"a": histogram([2.0, 3.0], [1.0, 6.0]),         # other tags
                                           "b": histogram([4.0], [2.0])}),
        ({"a/norm": 2.25, "a/max": 4.5}, {}),                                              # no histogram
        ({"a/norm": 3.25, "a/max": 6.5}, {"a": histogram([5.0, 6.0], [7.0, 8.0])}),
    ]
    with SummaryWriter(tmp_path) as writer:
        sink = TensorBoardSink(writer)
        for step, (scalars, histograms) in enumerate(windows):
            sink.log(scalars, histograms, step=step)
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "scalars": 0}).Reload()
    for tag in ("a/norm", "a/max", "b/norm"):
        expected = [(step, s[tag]) for step, (s, _) in enumerate(windows) if tag in s]
        assert [(e.step, e.value) for e in events.Scalars(tag)] == expected, tag
    for tag in ("a", "b"):
        expected = [(step, h[tag]) for step, (_, h) in enumerate(windows) if tag in h]
        read = events.Histograms(tag)
        assert [p.step for p in read] == [step for step, _ in expected], tag
        for point, (_, h) in zip(read, expected):
            value = point.histogram_value
            assert (list(value.bucket_limit), list(value.bucket)) == (h.limits, h.counts)
            assert (value.min, value.max, value.num, value.sum, value.sum_squares) == \
                (h.min, h.max, h.num, h.sum, h.sum_squares)


def test_the_sink_keeps_no_histogram_between_windows(tmp_path):
    """What the sink keeps from one window to the next is small (its encoder's headers and scalar
    template): no window's bucket lists or event bytes, 20 x 8 KB twice over here (a upb event kept
    between windows once held 0.2 MB more at the peak of a rank-16 LoRA: benchmarks/memory.py
    --tensorboard). Oracle: tracemalloc's live blocks allocated in the sink's own modules."""
    import tracemalloc

    from torch.utils.tensorboard import SummaryWriter

    from gradflow.monitor import event_encoding, sinks

    limits = [float(i) for i in range(500)]
    with SummaryWriter(tmp_path) as writer:
        sink = TensorBoardSink(writer)
        tracemalloc.start()
        try:
            for step in range(3):
                sink.log({"a/norm": 1.0 + step}, {f"h{i}": Histogram(limits, [1.0] * 500, -1.0, 500.0, 500.0, 1.0, 1.0)
                                                  for i in range(20)}, step)
            snapshot = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
    own = snapshot.filter_traces([tracemalloc.Filter(True, event_encoding.__file__), tracemalloc.Filter(True, sinks.__file__)])
    kept = sum(stat.size for stat in own.statistics("filename"))
    assert kept < 16_000, own.statistics("lineno")[:5]           # one window's event: 160 KB


def _intervals(left, limits, counts):
    """TensorBoard's reading of a histogram: (left, right, count) per bucket."""
    edges = [left, *limits]
    return [(edges[i], edges[i + 1], c) for i, c in enumerate(counts)]


def _count_between(intervals, a, b):
    return sum(c for left, right, c in intervals if a <= left and right <= b)


def test_sparse_buckets_keep_every_count_with_its_own_edges():
    import numpy as np

    from gradflow.monitor.sinks import sparse_buckets

    rng = np.random.default_rng(0)
    for _ in range(200):
        size = int(rng.integers(1, 40))
        counts = (rng.integers(1, 5, size) * (rng.random(size) < 0.3)).astype(float).tolist()  # mostly empty
        limits = sorted(rng.choice(np.arange(-500, 500), len(counts), replace=False).astype(float).tolist())
        left = limits[0] - 1
        full = _intervals(left, limits, counts)
        few_limits, few_counts = sparse_buckets(limits, counts)
        sparse = _intervals(left, few_limits, few_counts)
        assert sum(few_counts) == sum(counts)
        # every nonempty bucket keeps its exact edges and count
        assert [b for b in full if b[2]] == [b for b in sparse if b[2]]
        # and no kept bucket is wider than the gap it stands for with a count
        for a, b, c in sparse:
            assert c == _count_between(full, a, b)


def test_monitored_histograms_are_sparse_and_count_every_gradient_value(tmp_path):
    """The counts survive the empty-bucket drop: in the event file, a window's
    ``grad/<layer>/weight`` histogram holds every value of its histogrammed steps (0 and 10 of
    its 17: ``HISTOGRAM_EVERY``), 2 x parameter-size values."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from gradflow import GradientMonitor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 50), torch.nn.Tanh(), torch.nn.Linear(50, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 17
    with SummaryWriter(tmp_path) as writer, GradientMonitor(model, writer) as monitor:
        for epoch in range(2):
            for _ in range(steps):
                optimizer.zero_grad()
                model(torch.randn(16, 2)).pow(2).mean().backward()
                optimizer.step()
            monitor.log(epoch)
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    for name, parameter in model.named_parameters():
        points = events.Histograms(f"grad/{name.replace('.', '/')}")
        assert [p.step for p in points] == [0, 1]
        for point in points:
            h = point.histogram_value
            assert h.num == 2 * parameter.numel() == sum(h.bucket), name
            assert len(h.bucket_limit) == len(h.bucket)
            inner = list(h.bucket)[1:-1]
            assert not any(a == b == c == 0 for a, b, c in zip(inner, inner[1:], inner[2:])), "a run of empty buckets"


def test_write_custom_scalars_lays_out_every_layer_and_refuses_a_non_writer(tmp_path):
    """The public layout function: the monitor's categories after the caller's own, one chart per
    layer with a weight (input first), read back from the event file as TensorBoard reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    from torch.utils.tensorboard import SummaryWriter

    from gradflow.monitor.sinks import write_custom_scalars
    from gradflow.monitor.tensors import MonitorError

    names = ["encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "head.weight"]
    with SummaryWriter(str(tmp_path)) as writer:
        written = write_custom_scalars(writer, names, first={"loss": {"loss": ["Multiline", ["^loss$"]]}})
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    (tensor,) = events.Tensors(metadata.CONFIG_SUMMARY_TAG)             # where TensorBoard's plugin reads it
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensor.tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == list(written) == [
        "loss", "2. gradient size per layer", "3. ||g|| / ||w|| layer by layer (input first)", "4. weights and units"]
    per_layer = [chart.title for chart in layout.category[2].chart]
    assert per_layer == ["layer 1 of 3: encoder.0", "layer 2 of 3: encoder.2", "layer 3 of 3: head"]
    assert list(layout.category[2].chart[0].multiline.tag) == [r"^grad/encoder/0/[^/]*weight[^/]*/relative$"]
    with pytest.raises(MonitorError, match="needs a torch SummaryWriter"):
        write_custom_scalars(object(), names)
