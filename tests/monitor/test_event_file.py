"""The TensorBoard sink appends each window's event to the writer's file itself (sinks.EventFile).

Oracles: TensorBoard's own RecordWriter for the bytes of a record, TensorBoard's reader for the
file, and the events the test wrote through the writer's own queue at the same time.
"""

import io
import os
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.monitor.sinks import TensorBoardSink


def _records(path):
    """Every record of an event file, each checked against its two masked CRC32Cs (TensorBoard's)."""
    import struct

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data, records, at = Path(path).read_bytes(), [], 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(header)
        body = data[at + 12:at + 12 + length]
        assert struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0] == masked_crc32c(body)
        records.append(body)
        at += 16 + length
    assert at == len(data)
    return records


def _events(path):
    from tensorboard.compat.proto.event_pb2 import Event

    return [Event.FromString(record) for record in _records(path)]


def _event_files(directory):
    return sorted(str(p) for p in directory.iterdir() if "tfevents" in p.name)


def _monitored(writer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradientMonitor(model, writer)

    def window(step):
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, 3)).pow(2).mean().backward()
            optimizer.step()
        return monitor.log(step)

    return monitor, window


def test_each_window_is_in_the_file_when_log_returns_as_tensorboards_own_record(tmp_path):
    """No flush, no close: the window's event is the file's last record at once, byte for byte
    the record TensorBoard's RecordWriter makes of the same event, and the file reads whole."""
    from tensorboard.summary.writer.record_writer import RecordWriter
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path)
    monitor, window = _monitored(writer)
    stats = window(5)
    (path,) = _event_files(tmp_path)
    events = _events(path)
    last = events[-1]
    assert events[0].file_version.startswith("brain.Event")
    assert last.step == 5 and {v.tag for v in last.summary.value} >= {"grad/0/weight/norm", "grad/0/weight"}
    by_tag = {v.tag: v for v in last.summary.value}
    assert by_tag["grad/0/weight/norm"].simple_value == pytest.approx(stats["0.weight"]["norm"], rel=1e-6)
    oracle = io.BytesIO()
    RecordWriter(oracle).write(_records(path)[-1])
    assert Path(path).read_bytes().endswith(oracle.getvalue())
    assert isinstance(monitor._output.sinks[0][1], TensorBoardSink) and monitor._output.sinks[0][1]._file._fd
    monitor.remove()
    writer.close()


def test_windows_and_the_writers_own_queue_from_another_thread_never_mix_within_a_record(tmp_path):
    """A thread adds 400 scalars through the writer's queue (TensorBoard's thread appends them)
    while the monitor appends 25 windows: every record of the file is whole (both CRCs), each
    scalar is there once, each window once."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path, max_queue=3)
    monitor, window = _monitored(writer)
    done = threading.Event()

    def user():
        for i in range(400):
            writer.add_scalar("loss", float(i), i)
        done.set()

    thread = threading.Thread(target=user)
    thread.start()
    for step in range(25):
        window(step)
    thread.join()
    monitor.remove()
    writer.close()
    events = [e for path in _event_files(tmp_path) for e in _events(path)]
    losses = sorted(v.simple_value for e in events for v in e.summary.value if v.tag == "loss")
    windows = sorted(e.step for e in events if any(v.tag == "grad/total_norm" for v in e.summary.value))
    assert losses == [float(i) for i in range(400)] and windows == list(range(25))


def test_a_writer_closed_and_used_again_gets_its_windows_in_its_new_file(tmp_path):
    """SummaryWriter.close() and then more windows: torch opens a new event file; the windows go
    there, and the first file's descriptor is closed (no descriptor left open)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path, filename_suffix=".a")
    monitor, window = _monitored(writer)
    window(0)
    (first,) = _event_files(tmp_path)
    assert _open_on(first) == 1        # the sink's descriptor
    writer.close()                     # torch opens a new file at the next write
    writer.filename_suffix = ".b"
    window(1)
    second = next(path for path in _event_files(tmp_path) if path != first)
    assert _open_on(first) == 0 and _open_on(second) == 1
    monitor.remove()
    writer.close()
    steps = {path[-2:]: [e.step for e in _events(path) if e.HasField("summary")] for path in _event_files(tmp_path)}
    assert steps == {".a": [0], ".b": [1]}


def _open_on(path):
    """How many of this process's file descriptors are open on ``path`` (Linux's /proc)."""
    fds = os.listdir("/proc/self/fd")
    return sum(1 for fd in fds if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(path))


def test_a_file_tensorboard_does_not_append_to_itself_gets_the_windows_through_its_queue(tmp_path):
    """Where the writer's file object is not TensorBoard's appending stand-in (TensorFlow's GFile
    writes at its own offset: a second writer would overwrite it), nothing is appended from
    log(): the windows go through the writer's queue as before, and all are in the file."""
    from torch.utils.tensorboard import SummaryWriter

    class Wrapped:                      # a file object of another kind, writing through the real one
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

    writer = SummaryWriter(tmp_path)
    record_writer = writer._get_file_writer().event_writer._async_writer._writer
    record_writer._writer = Wrapped(record_writer._writer)
    monitor, window = _monitored(writer)
    for step in range(3):
        window(step)
    assert monitor._output.sinks[0][1]._file._fd is None
    monitor.remove()
    writer.close()
    (path,) = _event_files(tmp_path)
    assert [e.step for e in _events(path) if e.HasField("summary")] == [0, 1, 2]
