"""Where a window's statistics go: a TensorBoard ``SummaryWriter``, written as one event.

``SummaryWriter.add_scalar`` builds and queues one event per tag; a monitor writes a few
hundred tags per window, so the sink packs every scalar and histogram of a window into a single
``Summary`` and hands it to the writer's file writer once.

Example:
    >>> sink = TensorBoardSink(SummaryWriter("runs/demo"))
    >>> sink.log({"grad/dense_1/weight/norm": 0.3}, {}, step=0)
"""

from __future__ import annotations

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer import record_writer

try:
    import google_crc32c
except ImportError:  # pragma: no cover - a declared dependency; TensorBoard's slow path still works
    google_crc32c = None

from gradflow.monitor.stats import Histogram


class TensorBoardSink:
    """Writes scalars and histograms of one step to a SummaryWriter as one event."""

    def __init__(self, writer) -> None:
        self.writer = writer
        use_fast_checksums()

    def log(self, scalars: dict[str, float], histograms: dict[str, Histogram], step: int) -> None:
        if not scalars and not histograms:
            return
        file_writer = getattr(self.writer, "_get_file_writer", None)
        if file_writer is None:  # a writer-like object without the batched path
            self._log_one_by_one(scalars, histograms, step)
            return
        # Values added in place to the event's own summary: building Value messages first and
        # copying them in takes twice as long (upb protobuf, a few hundred values).
        event = Event()
        add = event.summary.value.add
        for tag, number in scalars.items():
            add(tag=tag, simple_value=number)
        for tag, h in histograms.items():
            add(tag=tag, histo={"min": h.min, "max": h.max, "num": h.num, "sum": h.sum, "sum_squares": h.sum_squares,
                                "bucket_limit": h.limits, "bucket": h.counts})
        file_writer().add_event(event, step)

    def _log_one_by_one(self, scalars, histograms, step) -> None:
        for tag, number in scalars.items():
            self.writer.add_scalar(tag, number, step)
        for tag, h in histograms.items():
            self.writer.add_histogram_raw(tag, h.min, h.max, h.num, h.sum, h.sum_squares, h.limits, h.counts, step)


def _masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(bytes(data))
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def use_fast_checksums() -> None:
    """Checksum TensorBoard records in C instead of pure Python.

    Without TensorFlow, TensorBoard's record writer computes each record's CRC32C in a Python
    loop, about half a microsecond a byte: a window's event of a few dozen histograms cost
    milliseconds, more than the training steps it describes. The bytes written are the same.
    """
    if google_crc32c is not None and record_writer.masked_crc32c is not _masked_crc32c:
        record_writer.masked_crc32c = _masked_crc32c
