"""Breaking this morning's performance changes the way a user would (brk7).

Oracles: the process's open descriptors (Linux's /proc/self/fd), TensorBoard's own reader of the
event file (each record's two masked CRC32Cs), and the statistics the monitor returned.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor

sys.path.insert(0, os.path.dirname(__file__))
from test_event_file import _event_files, _events, _open_on  # noqa: E402


def _windows(writer, steps, seed=0):
    """A small model's monitor writing ``steps`` windows of two optimizer steps to ``writer``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradientMonitor(model, writer)
    for step in steps:
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(8, 3)).pow(2).mean().backward()
            optimizer.step()
        monitor.log(step)
    return monitor


def test_a_removed_monitor_kept_after_its_writer_closed_holds_no_descriptor(tmp_path):
    """A sweep keeps each run's monitor (for its history) after `with SummaryWriter(...)`: before
    the fix each kept monitor held a descriptor on its run's event file (ulimit -n 1024: a long
    sweep ran out; a deleted run's disk space stayed held). Removed, a monitor holds none; a later
    log() of the same monitor still reaches its file."""
    from torch.utils.tensorboard import SummaryWriter

    kept = []
    for run in range(3):
        with SummaryWriter(tmp_path / str(run)) as writer:
            monitor = _windows(writer, [0])
            monitor.remove()
            kept.append(monitor)
    assert [_open_on(path) for run in range(3) for path in _event_files(tmp_path / str(run))] == [0, 0, 0]

    writer = SummaryWriter(tmp_path / "again")
    monitor = _windows(writer, [0])
    monitor.remove()
    assert _open_on(_event_files(tmp_path / "again")[0]) == 0
    with pytest.warns(UserWarning, match="after remove"):
        monitor.log(1)                      # after remove: a window still written, the file opened again
    writer.close()
    (path,) = _event_files(tmp_path / "again")
    assert [e.step for e in _events(path) if e.HasField("summary")] == [0, 1]


def test_without_google_crc32c_the_windows_go_through_the_writers_queue(tmp_path, monkeypatch):
    """The fast path checksums records with google_crc32c; where it cannot be imported the sink
    must still write (TensorBoard's queue and its pure-Python checksum), as the docstring of
    use_fast_checksums promises. Before the fix log() raised ImportError at every window."""
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    from tensorboard.summary.writer import record_writer
    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.setitem(sys.modules, "google_crc32c", None)      # import google_crc32c -> ImportError
    monkeypatch.setattr(record_writer, "masked_crc32c", pywrap_tensorflow.masked_crc32c)   # as never patched
    writer = SummaryWriter(tmp_path)
    monitor = _windows(writer, [0, 1])
    monitor.remove()
    writer.close()
    (path,) = _event_files(tmp_path)
    assert [e.step for e in _events(path) if e.HasField("summary")] == [0, 1]
