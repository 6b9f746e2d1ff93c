"""The TensorBoard sink's hand-encoded events (gradflow.monitor.event_encoding).

Oracle: TensorBoard's own protobuf classes (upb): ``Event(...).SerializeToString()`` of the same
content, byte for byte, over random windows with every edge the wire format has (varint length
boundaries, proto3's omitted defaults, float32 rounding and overflow); and TensorBoard's reader
on files the monitor wrote.
"""

import copy
import math
import random
import struct
import threading
import warnings

import numpy as np
import pytest
import torch
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
from test_thread_races import _run_together

from gradflow import GradientMonitor
from gradflow.monitor.event_encoding import STRUCT_BUCKETS, SummaryEncoder, event_bytes, varint
from gradflow.monitor.sinks import Sink, TeeSink, TensorBoardSink, sparse_buckets
from gradflow.monitor.stats import Histogram

SIGNALLING_NAN = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000001))[0]
SPECIAL = [0.0, -0.0, math.nan, -math.nan, SIGNALLING_NAN, math.inf, -math.inf, 1e300, -1e300, 5e-324, -5e-324,
           1e-45, 1.4e-45, 7e-46, 1.1754942e-38, 3.4028234663852886e38, 3.4028235677973362e38,
           3.4028235677973366e38, 2.0**128, 1.0, -2.5, 3, 2**200, np.float32(0.1), np.float64(-7.25)]
TAG_LENGTHS = [0, 1, 2, 126, 127, 128, 129, 16382, 16383, 16384, 16385]
BUCKET_COUNTS = [0, 1, 2, 15, 16, 17, STRUCT_BUCKETS, STRUCT_BUCKETS + 1, 300, 2047, 2048]


def _number(rng):
    """A double from the special list half the time, else of a random sign and magnitude."""
    if rng.random() < 0.5:
        return rng.choice(SPECIAL)
    return rng.choice([-1, 1]) * rng.random() * 10.0 ** rng.randint(-320, 308)


def _tag(rng, used):
    """A tag not yet in ``used``: a length around a varint boundary (UTF-8 bytes) now and then,
    non-ASCII letters (2-, 3- and 4-byte UTF-8) some of the time."""
    while True:
        if rng.random() < 0.2:
            tag = "é" * (rng.choice(TAG_LENGTHS) // 2) + "x" * rng.randint(0, 1)
        else:
            letters = "abc/_-" if rng.random() < 0.7 else "aé日🙂/"
            tag = "".join(rng.choice(letters) for _ in range(rng.randint(1, 40)))
        if tag not in used:
            used.add(tag)
            return tag


def _histogram(rng):
    n = rng.choice(BUCKET_COUNTS) if rng.random() < 0.3 else rng.randint(1, 40)
    limits = sorted(rng.uniform(-1e3, 1e3) for _ in range(n))
    counts = [float(rng.choice([0, 0, 1, 7, 2**40])) for _ in range(n)]
    if rng.random() < 0.05:                                 # limits and counts of different lengths
        counts = counts[:-1] if counts else [1.0]
    five = [_number(rng) if rng.random() < 0.3 else rng.uniform(-5, 5) for _ in range(5)]
    return Histogram(limits, counts, *five, sparse=rng.random() < 0.8)


def _window(rng, scalar_tags):
    used = set(scalar_tags)
    scalars = {tag: _number(rng) for tag in scalar_tags}
    histograms = {_tag(rng, used): _histogram(rng) for _ in range(rng.choice([0, 1, 3, 8]))}
    return scalars, histograms


def _oracle(wall_time, step, scalars, histograms):
    """The event TensorBoard's protobuf classes serialize for this window, the buckets made
    sparse where the histogram is not marked so (as the sink always gave them)."""
    values = [Summary.Value(tag=tag, simple_value=number) for tag, number in scalars.items()]
    for tag, h in histograms.items():
        limits, counts = (h.limits, h.counts) if h.sparse else sparse_buckets(h.limits, h.counts)
        values.append(Summary.Value(tag=tag, histo=HistogramProto(
            min=h.min, max=h.max, num=h.num, sum=h.sum, sum_squares=h.sum_squares, bucket_limit=limits, bucket=counts)))
    return Event(wall_time=wall_time, step=step, summary=Summary(value=values)).SerializeToString()


def test_random_windows_are_byte_for_byte_tensorboards_serialization():
    """400 windows through one encoder (its caches kept between them): the scalar tags stay for
    a while, then change (new tags, fewer, reordered); histograms of 0 to 2048 buckets, numbers
    +-0.0, NaN, +-inf, subnormal, beyond float32; and no warning escapes (1e300 -> inf)."""
    rng = random.Random(0)
    encoder = SummaryEncoder()
    used: set[str] = set()
    scalar_tags = [_tag(rng, used) for _ in range(5)]
    checked = 0
    for _ in range(400):
        if rng.random() < 0.3:
            scalar_tags = rng.sample(scalar_tags, rng.randint(0, len(scalar_tags))) + \
                [_tag(rng, used) for _ in range(rng.randint(0, 4))]
        scalars, histograms = _window(rng, scalar_tags)
        if not scalars and not histograms:
            continue
        wall_time = rng.choice([0.0, -0.0, 1.7e9 + rng.random(), math.nan])
        step = rng.choice([0, 1, 127, 128, 2**31, 2**32 + 5, 2**53 + 1, 2**63 - 1, -1, -(2**63), rng.randint(0, 10**6)])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            data = event_bytes(wall_time, step, encoder.encode(scalars, histograms))
        assert data == _oracle(wall_time, step, scalars, histograms), (step, scalars, histograms)
        checked += 1
    assert checked > 350


@pytest.mark.parametrize("n", [0, 1, 16, STRUCT_BUCKETS, STRUCT_BUCKETS + 1, 2048], ids=lambda n: f"{n}-buckets")
@pytest.mark.parametrize("zero", [None, 0.0, -0.0], ids=["no-zero", "plus-zero", "minus-zero"])
def test_each_number_of_a_histogram_at_zero_is_left_out_or_written_as_upb_does(n, zero):
    """proto3 leaves a double field out where its bits are all zero: +0.0 is not written, -0.0
    is; an empty bucket list is not written. Each of the five numbers in turn."""
    encoder = SummaryEncoder()
    for field in range(5):
        five = [1.5, -2.0, 3.0, 4.0, 5.0]
        if zero is not None:
            five[field] = zero
        h = Histogram([float(i) for i in range(n)], [1.0] * n, *five, sparse=True)
        assert encoder.encode({}, {"h": h}) == Summary(value=[Summary.Value(tag="h", histo=HistogramProto(
            min=five[0], max=five[1], num=five[2], sum=five[3], sum_squares=five[4],
            bucket_limit=h.limits, bucket=h.counts))]).SerializeToString()
    if zero is not None:                   # all five at zero, no buckets: an empty histogram (+0.0) or five doubles
        written = encoder.encode({}, {"h": Histogram([], [], zero, zero, zero, zero, zero, sparse=True)})
        assert written == Summary(value=[Summary.Value(tag="h", histo=HistogramProto(
            min=zero, max=zero, num=zero, sum=zero, sum_squares=zero))]).SerializeToString()
        assert len(written) == (7 if math.copysign(1, zero) > 0 else 7 + 45), written.hex()


def test_a_scalar_at_zero_is_written_and_an_empty_tag_is_not():
    """``simple_value`` is in a oneof: 0.0 is written (5 bytes); the tag "" is proto3's default."""
    data = SummaryEncoder().encode({"": 0.0, "a": -0.0}, {})
    assert data == Summary(value=[Summary.Value(tag="", simple_value=0.0),
                                  Summary.Value(tag="a", simple_value=-0.0)]).SerializeToString()
    assert data.hex() == "0a05" "1500000000" "0a08" "0a0161" "1500000080"


def test_a_scalar_beyond_float32_is_inf_with_no_warning():
    """upb rounds a double to float32 with C's cast: 1e300 is +inf, -1e300 -inf, 1e-50 +0.0;
    numpy would warn ("overflow encountered in cast"): nothing may reach the user's loop."""
    scalars = {"big": 1e300, "small": -1e300, "tiny": 1e-50, "max": 3.4028235677973366e38}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = SummaryEncoder().encode(scalars, {})
    assert data == Summary(value=[Summary.Value(tag=t, simple_value=x) for t, x in scalars.items()]).SerializeToString()
    assert [v.simple_value for v in Summary.FromString(data).value] == [math.inf, -math.inf, 0.0, math.inf]


@pytest.mark.parametrize("step", [0, 1, 127, 128, 2**31, 2**53 + 1, 2**63 - 1, -1, -(2**63), np.int64(7), torch.tensor(9)],
                         ids=["0", "1", "127", "128", "2^31", "2^53+1", "int64-max", "-1", "int64-min", "numpy", "tensor"])
def test_steps_are_written_as_upb_writes_them(step):
    assert event_bytes(12.5, step, b"") == Event(wall_time=12.5, step=int(step), summary=Summary()).SerializeToString()


@pytest.mark.parametrize("step", [2**63, -(2**63) - 1])
def test_a_step_beyond_int64_is_refused_as_upb_refuses_it(step):
    with pytest.raises(ValueError, match="out of range"):
        Event(step=step)
    with pytest.raises(ValueError, match=r"int64 \(-2\*\*63 <= step < 2\*\*63\)"):
        event_bytes(1.0, step, b"")


@pytest.mark.parametrize("number", [0, 1, 127, 128, 16383, 16384, 2**21, 2**63, 2**64 - 1])
def test_varints_are_upbs(number):
    """Oracle: upb's int64 ``step`` (a number past 2**63 as the negative step of the same bits)."""
    expected = Event(step=number if number < 2**63 else number - 2**64).SerializeToString()
    assert expected == (b"\x10" + varint(number) if number else b"")


class Recorder(Sink):
    """Keeps every window it is given, as the TensorBoard sink next to it gets it."""

    def __init__(self):
        self.windows = []

    def log(self, scalars, histograms, step):
        self.windows.append((dict(scalars), dict(histograms), step))


def _summary_events(directory):
    """(record, Event) of each window's record in the run's event files, as TensorBoard's own
    reader gives them (it checks both CRCs of every record)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    records = [record for path in sorted(directory.glob("*tfevents*")) for record in RawEventFileLoader(str(path)).Load()]
    return [(record, Event.FromString(record)) for record in records if Event.FromString(record).HasField("summary")]


def _monitored_windows(sink, windows=4):
    """A monitored MLP (ReLU, so some gradients are exactly 0) writing to ``sink`` (a
    TensorBoardSink): each window's content, and whether the sink held the file open after it
    (it appends from log()) or not (the windows queued)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    recorder, appended = Recorder(), []
    with GradientMonitor(model, TeeSink(sink, recorder)) as monitor:
        for epoch in range(windows):
            for _ in range(16):
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(torch.randn(32, 4)), torch.randn(32, 1)).backward()
                optimizer.step()
            monitor.log(epoch)
            appended.append(sink._file._fd is not None)
    return recorder.windows, appended


def test_a_monitored_runs_file_is_the_events_tensorboards_classes_make_and_reads_back(tmp_path):
    """Each window's record is byte for byte the event upb serializes of what the sink was given
    (at the record's own time), and TensorBoard's EventAccumulator reads back every scalar (as
    float32) and every histogram (its numbers and sparse buckets) exactly."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path) as writer:
        sink = TensorBoardSink(writer)
        windows, appended = _monitored_windows(sink)
    assert appended == [True] * 4
    events = _summary_events(tmp_path)
    assert [e.step for _, e in events] == [step for _, _, step in windows] == [0, 1, 2, 3]
    for (record, event), (scalars, histograms, step) in zip(events, windows):
        assert record == _oracle(event.wall_time, step, scalars, histograms)
    read = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "scalars": 0}).Reload()
    for scalars, histograms, step in windows:
        for tag, number in scalars.items():
            (point,) = [p for p in read.Scalars(tag) if p.step == step]
            assert struct.pack("<f", point.value) == np.float32(number).tobytes(), tag
        for tag, h in histograms.items():
            (point,) = [p for p in read.Histograms(tag) if p.step == step]
            value = point.histogram_value
            assert (value.min, value.max, value.num, value.sum, value.sum_squares) == \
                (h.min, h.max, h.num, h.sum, h.sum_squares)
            assert (list(value.bucket_limit), list(value.bucket)) == _sparse(h)
    assert all(scalars and histograms for scalars, histograms, _ in windows)


def _sparse(h):
    return tuple(map(list, (h.limits, h.counts) if h.sparse else sparse_buckets(h.limits, h.counts)))


def test_windows_queued_where_the_file_is_not_appended_to_are_the_same_events(tmp_path):
    """Where EventFile cannot append (the writer's file object is not TensorBoard's own), the
    summary goes through the writer's queue as an Event parsed from the same bytes: each record
    is still the event upb makes of the window."""
    from torch.utils.tensorboard import SummaryWriter

    class Wrapped:                      # a file object of another kind, writing through the real one
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

    with SummaryWriter(tmp_path) as writer:
        record_writer = writer._get_file_writer().event_writer._async_writer._writer
        record_writer._writer = Wrapped(record_writer._writer)
        sink = TensorBoardSink(writer)
        windows, appended = _monitored_windows(sink, windows=2)
    assert appended == [False] * 2
    events = _summary_events(tmp_path)
    assert [e.step for _, e in events] == [0, 1]
    for (record, event), (scalars, histograms, step) in zip(events, windows):
        assert record == _oracle(event.wall_time, step, scalars, histograms)


def test_one_sink_logged_to_from_several_threads_writes_each_window_whole(tmp_path):
    """Four threads share one sink, each with scalar tags of its own (so the sink's scalar
    template changes at nearly every window) and a histogram, started together and switching
    every microsecond: no thread raises, and every record is the event upb makes of the window
    its thread gave."""

    from torch.utils.tensorboard import SummaryWriter

    def windows_of(thread):
        rng = random.Random(thread)
        return [({f"t{thread}/s{i}": rng.random() for i in range(thread + 2)},
                 {f"t{thread}/h": Histogram([1.0, 2.0], [float(step), 1.0], 0.5, 2.0, step + 1.0, 3.0, 4.0, sparse=True)},
                 thread * 1000 + step) for step in range(150)]

    expected = {t: windows_of(t) for t in range(4)}
    start, errors = threading.Barrier(4), []

    def run(sink, windows):
        start.wait()
        try:
            for window in windows:
                sink.log(*window)
        except Exception as error:
            errors.append(error)

    with SummaryWriter(tmp_path) as writer:
        sink = TensorBoardSink(writer)
        _run_together(*[(run, (sink, expected[t])) for t in range(4)], switch=1e-6)
    assert not errors, errors
    events = {e.step: (record, e) for record, e in _summary_events(tmp_path)}
    windows = [w for t in range(4) for w in expected[t]]
    assert sorted(events) == sorted(step for _, _, step in windows)
    for scalars, histograms, step in windows:
        record, event = events[step]
        assert record == _oracle(event.wall_time, step, scalars, histograms)


# -- the kernel's histograms, encoded as they lie (histograms.BuiltHistograms) -----------------

def _built(rng, rows, dtype, capacity=None):
    """A window's value and log10 histograms of ``rows`` rows from two random counts tables of
    ``dtype``, as ``HistogramRequests.build`` makes them for one member (``capacity``: the
    kernel's buffers, in buckets; small ones make several chunks), with a linear one after them;
    some rows empty (no histogram) or holding exact zeros alone."""
    from gradflow.monitor import histograms as H

    tables = [(rng.integers(0, 2**40 if dtype == np.int64 else 50, size=(rows, 512)) *
               (rng.random((rows, 512)) < rng.choice([0.01, 0.1, 0.9]))).astype(dtype) for _ in range(2)]
    tables[0][0] = 0                                   # no value at all: no histogram
    tables[1][0] = 0
    tables[1][0, [0, 256]] = 3                         # exact zeros alone
    used: set[str] = set()
    wanted = H.HistogramRequests()
    for i in rng.permutation(rows):
        for table in tables:
            wanted.value(0, _tag(random.Random(int(rng.integers(1 << 30))), used), table, i)
            wanted.log10(0, _tag(random.Random(int(rng.integers(1 << 30))), used), table, i)
    wanted.linear(0, "linear/tanh", np.arange(H.LINEAR_BINS, dtype=np.int64)[None], 0, (-1.0, 1.0))
    if capacity is not None:
        old, H.BUILD_BUCKETS = H.BUILD_BUCKETS, capacity
        try:
            return wanted.build(members=1)[0]
        finally:
            H.BUILD_BUCKETS = old
    return wanted.build(members=1)[0]


@pytest.mark.parametrize("dtype", [np.int64, np.float64], ids=["int64", "float64"])
@pytest.mark.parametrize("capacity", [None, 509, 2 * 509], ids=["one-chunk", "chunks-of-1", "chunks-of-2"])
def test_the_kernels_histograms_are_encoded_byte_for_byte_as_upb_serializes_them(dtype, capacity):
    """``HistogramEncoder`` writes a ``BuiltHistograms``' rows from the kernel's arrays in one
    compiled call: the bytes upb gives for the same histograms made as objects, rows with no
    value left out, with every kind of tag (a varint boundary's length, 2- to 4-byte UTF-8),
    several buffers' chunks, and one encoder's tag cache over windows whose tags change."""
    from gradflow.monitor.histograms import BuiltHistograms

    rng = np.random.default_rng(7)
    encoder = SummaryEncoder()
    for window in range(6):
        built = _built(rng, int(rng.integers(1, 30)), dtype, capacity=capacity)
        assert isinstance(built, BuiltHistograms)
        assert capacity != 509 or len(built.rows.chunks) > 1
        scalars = {"loss": 0.25} if window % 2 else {}
        data = encoder.encode(scalars, built)
        assert built._dict is None                          # no Histogram was made to write them
        made = built.as_dict()
        assert len(made) == len(built) < len(built.tags) + 1 and "linear/tanh" in made
        assert event_bytes(0.0, 0, data) == _oracle(0.0, 0, scalars, made)


def test_each_number_of_a_built_row_at_zero_is_left_out_or_written_as_upb_does():
    """proto3's defaults in the kernel's writer: a number whose bits are all zero (+0.0) is left
    out, -0.0 and NaN are written; a row of no bucket writes no list. Rows made by hand, each
    number of the five in turn, beside rows of 1, 64, 65 and 2048 buckets (varint boundaries)."""
    from gradflow.monitor.histograms import BuiltHistograms
    from gradflow.monitor.stats import BuiltRows

    cases = []
    for field in range(5):
        for zero in (0.0, -0.0, math.nan):
            five = [1.5, -2.0, 3.0, 4.0, 5.0]
            five[field] = zero
            cases.append((five, 3))
    cases += [([0.0] * 5, 0), ([-0.0] * 5, 0), ([1.0, 2.0, 3.0, 4.0, 5.0], 64), ([1.0, 2.0, 3.0, 4.0, 5.0], 65),
              ([-1e300, 1e300, 2.0**60, -7.0, 1e-320], 2048)]
    ends = np.cumsum([0] + [n for _, n in cases]).astype(np.int64)
    limits = np.arange(ends[-1], dtype=np.float64) * 0.5 - 3.0
    counts = np.arange(ends[-1], dtype=np.float64) + 1.0
    rows = BuiltRows(np.array([five for five, _ in cases]), np.ones(len(cases), np.bool_),
                     [(0, len(cases), ends, limits, counts)])
    tags = [f"h{i}" for i in range(len(cases))]
    built = BuiltHistograms(tags, rows, {})
    expected = Summary(value=[Summary.Value(tag=tag, histo=HistogramProto(
        min=five[0], max=five[1], num=five[2], sum=five[3], sum_squares=five[4],
        bucket_limit=limits[a:b].tolist(), bucket=counts[a:b].tolist()))
        for tag, (five, _), a, b in zip(tags, cases, ends, ends[1:])]).SerializeToString()
    assert SummaryEncoder().encode({}, built) == expected


class _RecordingTensorBoardSink(TensorBoardSink):
    """The monitor's TensorBoard sink, keeping each window it is handed (the histograms as
    objects, made from what it got after it wrote them) and what kind of mapping they came in."""

    built_histograms = True          # it overrides log(): handed the kernel's rows only where it says so

    def __init__(self, writer):
        super().__init__(writer)
        self.windows, self.kinds = [], []

    def log(self, scalars, histograms, step):
        self.kinds.append(type(histograms).__name__)
        super().log(scalars, histograms, step)
        self.windows.append((dict(scalars), dict(histograms), step))


def test_a_run_written_straight_to_tensorboard_is_upbs_events_and_other_sinks_get_dicts(tmp_path):
    """A SummaryWriter given as the monitor's writer gets the kernel's histograms as they lie
    (``BuiltHistograms``): each window's record is byte for byte the event upb serializes of
    those histograms made as objects, and TensorBoard's reader gets them back. Beside it, a sink
    of the user's and a TeeSink are handed plain dicts with the same histograms."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 1))
    models = [copy.deepcopy(model) for _ in range(3)]              # one monitor each: the same training
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    batches = [(torch.randn(32, 4), torch.randn(32, 1)) for _ in range(24)]
    with SummaryWriter(tmp_path / "direct") as writer, SummaryWriter(tmp_path / "tee") as tee_writer:
        sink, mine, in_tee = _RecordingTensorBoardSink(writer), Recorder(), Recorder()
        monitors = [GradientMonitor(m, w) for m, w in zip(models, (sink, mine, TeeSink(in_tee, tee_writer)))]
        for epoch in range(3):
            for x, y in batches[8 * epoch:8 * epoch + 8]:
                for m, optimizer in zip(models, optimizers):
                    optimizer.zero_grad()
                    torch.nn.functional.mse_loss(m(x), y).backward()
                    optimizer.step()
            for monitor in monitors:
                monitor.log(epoch)
        for monitor in monitors:
            monitor.remove()
    assert sink.kinds == ["BuiltHistograms"] * 3
    events = _summary_events(tmp_path / "direct")
    assert [e.step for _, e in events] == [0, 1, 2]
    for (record, event), (scalars, histograms, step) in zip(events, sink.windows):
        assert record == _oracle(event.wall_time, step, scalars, histograms)
        assert any(tag.startswith("activation/") for tag in histograms)     # the tanh's linear one among them
    for recorder in (mine, in_tee):
        assert [type(h) for _, h, _ in recorder.windows] == [dict] * 3
        for (_, theirs, _), (_, ours, _) in zip(recorder.windows, sink.windows):
            assert theirs == ours
    read = EventAccumulator(str(tmp_path / "direct"), size_guidance={"histograms": 0}).Reload()
    for _, histograms, step in sink.windows:
        for tag, h in histograms.items():
            (point,) = [p for p in read.Histograms(tag) if p.step == step]
            assert (list(point.histogram_value.bucket_limit), list(point.histogram_value.bucket)) == _sparse(h)
