"""Where a window's statistics go: the sink protocol, and its TensorBoard implementation.

A sink takes one window at a time: ``log(scalars, histograms, step)``, with ``scalars`` a dict
tag -> number (a float; counts, such as ``grad/<param>/nonfinite``, an int), ``histograms`` a
dict tag -> ``Histogram`` and ``step`` an int. ``flush()`` of a monitor pooling histograms
(``histograms=N``) calls ``log({}, histograms, step)``: no scalars. ``as_sink`` turns what a user
passes as ``writer`` into a sink, or says in one line what it accepts:

- a TensorBoard ``SummaryWriter`` (torch's, or anything with ``add_scalar`` and
  ``add_histogram_raw``): every scalar and histogram, as one event per window, and the rare
  texts through ``add_text``;
- a ``Sink`` subclass of your own;
- ``ScalarSink(fn)`` for loggers that take scalars only, ``fn(scalars, step)``: e.g.
  ``ScalarSink(lightning_logger.log_metrics)`` or ``ScalarSink(lambda s, step: run.log(s, step=step))``;
- ``TeeSink(a, b, ...)`` for several of these at once.

``SummaryWriter.add_scalar`` builds and queues one event per tag; a monitor writes a few
hundred tags per window, so ``TensorBoardSink`` packs every scalar and histogram of a window
into a single ``Summary``, encoded as bytes by hand (``event_encoding``: the bytes upb's
``SerializeToString`` gives, in about half the time of filling its message), and appends it to
the writer's file once (``EventFile``). Histograms go to
TensorBoard without their runs of empty buckets (``sparse_buckets``): the counts are the same,
the event files a fraction of the size.

Example:
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> with SummaryWriter("runs/demo") as writer:
    ...     as_sink(writer).log({"grad/dense_1/weight/norm": 0.3}, {}, step=0)
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gradflow.monitor.event_encoding import SummaryEncoder, event_bytes
from gradflow.monitor.order import layer_of
from gradflow.monitor.stats import Histogram, drawn_buckets, sparse_buckets  # noqa: F401  (sparse_buckets: re-exported)
from gradflow.monitor.tensors import MonitorError


class Sink:
    """Base class of the sinks: receives each window's scalars and histograms at ``step``, and
    now and then a text (``text``: dropped unless a sink overrides it). ``draws``: whether it
    takes histograms; where no sink of a monitor does, none is built (nor the weights' counts)."""

    draws = True
    # Whether log() may be handed the kernel's ``histograms.BuiltHistograms`` (a read-only mapping)
    # instead of a dict: the monitor's own TensorBoardSink, which encodes them as they lie.
    built_histograms = False

    def log(self, scalars: dict[str, float], histograms: dict[str, Histogram], step: int) -> None:
        raise NotImplementedError

    def text(self, texts: dict[str, str], step: int) -> None:
        """A window's texts, tag -> Markdown (the idle parameters' names); none in most windows."""

    def release(self) -> None:
        """Let go of what the sink holds open between windows (``TensorBoardSink``: its descriptor
        on the writer's event file); a later window opens it again. The monitor's ``remove()``
        calls it. Never raises."""


class ScalarSink(Sink):
    """Passes each window's scalars to ``fn(scalars, step)``; histograms are dropped."""

    draws = False

    def __init__(self, fn: Callable[[dict[str, float], int], Any]) -> None:
        if not callable(fn):
            raise MonitorError(f"ScalarSink needs a callable fn(scalars, step), got {type(fn).__name__}")
        self.fn = fn

    def log(self, scalars: dict[str, float], histograms: dict[str, Histogram], step: int) -> None:
        if scalars:
            self.fn(scalars, step)


class TeeSink(Sink):
    """Sends each window to several writers or sinks (each checked by ``as_sink``)."""

    def __init__(self, *writers: Any) -> None:
        self.sinks = [as_sink(w) for w in writers]

    @property
    def draws(self) -> bool:
        return any(sink.draws for sink in self.sinks)

    def log(self, scalars: dict[str, float], histograms: dict[str, Histogram], step: int) -> None:
        self._each(lambda sink: sink.log(scalars, histograms, step))

    def text(self, texts: dict[str, str], step: int) -> None:
        self._each(lambda sink: sink.text(texts, step))

    def release(self) -> None:
        """Each sink's ``release``, even after one raised; then MonitorError naming the first."""
        self._each(lambda sink: sink.release())

    def _each(self, call: Callable[[Sink], None]) -> None:
        """``call`` on every sink, even after one raised (one failing logger does not keep the
        window from the others); then MonitorError naming the first that raised, chained to its error."""
        failed = []
        for sink in self.sinks:
            try:
                call(sink)
            except Exception as error:
                failed.append((sink, error))
        if failed:
            sink, error = failed[0]
            raise MonitorError(f"{describe(sink)} raised {type(error).__name__}: {first_line(error)}") from error


def describe(sink: Sink) -> str:
    """A sink's name in a message: the writer's type for a TensorBoard sink, else the sink's."""
    return type(sink.writer if isinstance(sink, TensorBoardSink) else sink).__name__


def first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0]


def is_summary_writer(writer: Any) -> bool:
    return callable(getattr(writer, "add_scalar", None)) and callable(getattr(writer, "add_histogram_raw", None))


def as_sink(writer: Any) -> Sink:
    """The sink for what a user passed as ``writer``; MonitorError for anything else."""
    if isinstance(writer, type):          # the class, not one: its methods are found, but unbound
        raise MonitorError(f"writer must be a writer object, got the class {writer.__module__}.{writer.__qualname__} "
                           "itself: pass an instance of it, e.g. SummaryWriter(log_dir) or ScalarSink(fn)")
    if isinstance(writer, Sink):
        return writer
    if is_summary_writer(writer):
        return TensorBoardSink(writer)
    hint = ""
    if hasattr(writer, "experiment") and hasattr(writer, "log_metrics"):       # a Lightning logger
        hint = " (for a Lightning logger pass logger.experiment if it is a TensorBoardLogger, else ScalarSink(logger.log_metrics))"
    raise MonitorError(
        f"writer must be a torch SummaryWriter, None, a gradflow.monitor.sinks.Sink, ScalarSink(fn) or "
        f"TeeSink(...); got {type(writer).__module__}.{type(writer).__qualname__}{hint}")


class TensorBoardSink(Sink):
    """Writes scalars and histograms of one step to a SummaryWriter as one event."""

    @property
    def built_histograms(self) -> bool:
        """Whether ``log`` is this class's own, which encodes the kernel's rows as they lie: a
        subclass's ``log`` (its own, a mixin's) or one put on the instance is a user's, handed
        dicts as the ``Sink`` protocol says (it may edit them). A subclass that takes the rows
        says so with ``built_histograms = True``."""
        return getattr(self.log, "__func__", None) is TensorBoardSink.log

    def __init__(self, writer) -> None:
        self.writer = writer
        self._encoder = SummaryEncoder()      # a window's Summary as bytes (event_encoding: ~122 -> ~65 us a window)
        self._lock = threading.Lock()         # one sink passed to monitors in several threads: one window at a time
        self._file = EventFile()              # the writer's event file, appended to from log() where it can be
        use_fast_checksums()

    def log(self, scalars: dict[str, float], histograms: dict[str, Histogram], step: int) -> None:
        if not scalars and not histograms:
            return
        file_writer = getattr(self.writer, "_get_file_writer", None)
        if file_writer is None:  # a writer-like object without the batched path
            self._log_one_by_one(scalars, histograms, step)
            return
        with self._lock:                      # its caches: one window at a time
            summary = self._encoder.encode(scalars, histograms)
        writer = file_writer()
        if not self._file.append(writer, summary, step):
            writer.add_event(summary_event(summary), step)

    def text(self, texts: dict[str, str], step: int) -> None:
        """Each text through the writer's ``add_text`` (TensorBoard's Text tab, tag
        ``<tag>/text_summary``); a writer-like object without one gets none."""
        add_text = getattr(self.writer, "add_text", None)
        if add_text is not None:
            for tag, text in texts.items():
                add_text(tag, text, step)

    def release(self) -> None:
        """Close the descriptor on the writer's event file (a monitor removed but kept, its writer
        closed, held one per monitor: a sweep keeping its monitors ran out of descriptors)."""
        self._file.close()

    def _log_one_by_one(self, scalars, histograms, step) -> None:
        for tag, number in scalars.items():
            self.writer.add_scalar(tag, number, step)
        for tag, h in histograms.items():
            limits, counts = drawn_buckets(h)
            self.writer.add_histogram_raw(tag, h.min, h.max, h.num, h.sum, h.sum_squares, limits, counts, step)


class EventFile:
    """Appends a window's event to its ``SummaryWriter``'s event file from the calling thread.

    A ``SummaryWriter`` hands each event to a queue that TensorBoard's writer thread empties; without
    TensorFlow that thread opens the file, appends the record and closes it again (its ``GFile``),
    releasing the GIL at each call, while the training thread releases it at every torch op: the
    tutorial's MLP, one 13 KB event per 16 steps, paid 0.027-0.032 of its step for the hand-over
    (``benchmarks/overhead.py``'s setting, 13 interleaved rounds at load 0.8: 1.384x with the queue,
    1.352x appending here). The record is the one TensorBoard writes (length, masked CRC32C, data,
    masked CRC32C), in one ``write`` to a descriptor opened with ``O_APPEND``, as each of TensorBoard's
    own appends is: the two never interleave within a record, and the file is the stream of records
    TensorBoard reads. Each window's event is on disk when ``log()`` returns.

    Only where TensorBoard's own writer appends (its stand-in ``GFile`` on a local file system) and
    once the file's first record (its version, queued when the writer opened the file) is written:
    ``append`` returns False everywhere else (TensorFlow's ``GFile``, which writes at its own offset;
    a remote log dir; a closed writer; a writer-like object), and the sink queues the event as before.
    A writer closed and used again (a new event file) is followed; the descriptor is closed with it.
    A file deleted since (its run directory removed) is left to the queue too, whose writer thread
    fails and says so at the next write: nothing is appended to a file no one can read.
    """

    def __init__(self) -> None:
        self._owner: Any = None               # weak reference to the EventFileWriter the descriptor is for
        self._fd: int | None = None
        self._closer: weakref.finalize | None = None      # closes the descriptor if this object is collected
        self._lock = threading.Lock()

    def append(self, file_writer: Any, summary: bytes, step: int) -> bool:
        """Append an event of ``summary`` (a serialized ``Summary``) at ``step``, stamped now, to
        ``file_writer``'s file; False where it must be queued instead (``summary_event``)."""
        event_writer = getattr(file_writer, "event_writer", None)
        with self._lock:
            if self._owner is None or self._owner() is not event_writer:
                self._open(file_writer, event_writer)
            elif _closed(event_writer) or (self._fd is not None and os.fstat(self._fd).st_nlink == 0):
                self._close()             # the file deleted (its run directory removed): the queue, which says so
            if self._fd is None:
                return False
            data = event_bytes(time.time(), step, summary)
            header = _LENGTH.pack(len(data))
            record = b"".join((header, _CRC.pack(_masked_crc32c(header)), data, _CRC.pack(_masked_crc32c(data))))
            written = os.write(self._fd, record)
            while written < len(record):      # a short write to a regular file (a signal, a full disk): the rest
                written += os.write(self._fd, record[written:])
        return True

    def _open(self, file_writer: Any, event_writer: Any) -> None:
        self._close()
        self._owner = weakref.ref(event_writer) if event_writer is not None else None
        path = _appendable_path(event_writer)
        if path is None:
            return
        file_writer.flush()                   # the queue empty: the file's first record (its version) is written
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._closer = weakref.finalize(self, _close_fd, self._fd)

    def _close(self) -> None:
        if self._fd is not None:
            self._closer.detach()             # else it would close whatever file reuses the number
            _close_fd(self._fd)
            self._fd = self._closer = None

    def close(self) -> None:
        with self._lock:
            self._close()
            self._owner = None


_LENGTH = struct.Struct("<Q")                 # a record's header: the event's length
_CRC = struct.Struct("<I")                    # each masked CRC32C after it


def summary_event(summary: bytes) -> Any:
    """An ``Event`` holding ``summary`` (a serialized ``Summary``), for the writer's queue, which
    stamps its time and step; rare (``EventFile.append`` writes the bytes where it can)."""
    from tensorboard.compat.proto.event_pb2 import Event

    return Event.FromString(event_bytes(0.0, 0, summary))


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _closed(event_writer: Any) -> bool:
    return bool(getattr(getattr(event_writer, "_async_writer", None), "_closed", True))


def _appendable_path(event_writer: Any) -> str | None:
    """The local path of ``event_writer``'s file where TensorBoard itself appends to it (its stand-in
    ``GFile`` on the local file system, the writer open), else None."""
    try:
        import google_crc32c  # noqa: F401  (the record's checksums; without it, TensorBoard's queue and its own)
        from tensorboard.compat.tensorflow_stub.io import gfile
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        return None
    if type(event_writer) is not EventFileWriter or _closed(event_writer):
        return None
    file = getattr(getattr(event_writer._async_writer, "_writer", None), "_writer", None)
    path = getattr(event_writer, "_file_name", None)
    if (type(file) is not gfile.GFile or not isinstance(getattr(file, "fs", None), gfile.LocalFileSystem)
            or not getattr(file, "fs_supports_append", False) or not isinstance(path, str) or "://" in path
            or not os.path.isfile(path)):
        return None
    return path


def _masked_crc32c(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data if type(data) is bytes else bytes(data))   # a window's event: no copy
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def use_fast_checksums() -> None:
    """Checksum TensorBoard records in C instead of pure Python.

    Without TensorFlow, TensorBoard's record writer computes each record's CRC32C in a Python
    loop, about half a microsecond a byte: a window's event of a few dozen histograms cost
    milliseconds, more than the training steps it describes. The bytes written are the same.
    """
    from tensorboard.summary.writer import record_writer

    try:
        import google_crc32c  # noqa: F401  (a declared dependency; TensorBoard's slow path still works)
    except ImportError:  # pragma: no cover
        return
    if record_writer.masked_crc32c is not _masked_crc32c:
        record_writer.masked_crc32c = _masked_crc32c


# -- TensorBoard's Custom Scalars tab ------------------------------------------------------------

# TensorBoard's layout has no setting for a log y axis (layout.proto's Chart holds a title and
# tag regexes only), so each chart's own log-scale button is named in the title, and every layer
# also gets a chart of its own: its y range is its own, so a layer 1000x below the output layer
# is not a flat line at 0, and runs side by side (tanh, ReLU) differ at a glance.
LOG_BUTTON = "log y: the chart's second button"
MAX_LAYER_CHARTS = 48  # a transformer has hundreds of layers; the all-layers chart still has them all


def custom_scalars_layout(parameters: Sequence[str], first: Mapping[str, Mapping[str, list]] | None = None
                          ) -> dict[str, dict[str, list]]:
    """The Custom Scalars layout for a monitored model, as ``SummaryWriter.add_custom_scalars``
    takes it: ``{category: {chart title: ["Multiline", [tag regexes]]}}``, in display order.

    ``parameters`` are the model's ``named_parameters()`` names (``monitor.names``), input side
    first; their layers are the names before the last dot that own a weight. ``first``: categories
    of your own to put before the monitor's (``gradflow train`` puts accuracy and loss there).
    The monitor's categories: gradient size (every layer's ||g|| / ||w||, the size diagnose
    judges, in one chart, then its mean |g|, its max |g|, the total norm), ||g|| / ||w|| layer by
    layer (one chart per layer, input first, at most
    ``MAX_LAYER_CHARTS``), then weights and units (update ratio, saturated or dead fraction,
    non-finite values).

    Example:
        >>> layout = custom_scalars_layout(["0.weight", "0.bias", "2.weight"])
        >>> list(layout)
        ['gradient size per layer', '||g|| / ||w|| layer by layer (input first)', 'weights and units']
        >>> layout['||g|| / ||w|| layer by layer (input first)']['layer 2 of 2: 2']
        ['Multiline', ['^grad/2/[^/]*weight[^/]*/relative$']]
    """
    import re

    parameters = _parameter_names(parameters)
    layers = list(dict.fromkeys(layer_of(name) for name in parameters
                                if "weight" in name.rpartition(".")[2] and "." in name))
    number = len(first or {})
    label = (lambda title: f"{number + 1}. {title}") if first else (lambda title: title)
    per_layer = {f"layer {i + 1} of {len(layers)}: {layer}":
                 ["Multiline", [f"^grad/{re.escape(layer.replace('.', '/'))}/[^/]*weight[^/]*/relative$"]]
                 for i, layer in enumerate(layers[:MAX_LAYER_CHARTS])}
    layout = dict(first or {})
    layout[label("gradient size per layer")] = {
        f"||g|| / ||w|| of every layer's weight, what diagnose judges ({LOG_BUTTON})": [
            "Multiline", [r"^grad/.*/weight/relative$"]],
        f"mean |g| of every layer's weight (not scale-free: not what diagnose judges; {LOG_BUTTON})": [
            "Multiline", [r"^grad/.*/weight/mean_abs$"]],
        f"max |g| of every layer's weight ({LOG_BUTTON})": ["Multiline", [r"^grad/.*/weight/max_abs$"]],
        "total gradient norm per step": ["Multiline", [r"^grad/total_norm(_before_clip)?$"]],
    }
    number += 1
    if per_layer:
        layout[label("||g|| / ||w|| layer by layer (input first)")] = per_layer
        number += 1
    layout[label("weights and units")] = {
        "update ratio |w_end - w_start| / |w_start| per layer": ["Multiline", [r"^weight/.*/weight/update_ratio$"]],
        "saturated (tanh, sigmoid) or dead (ReLU) fraction": ["Multiline",
                                                              [r"^activation/.*/(saturated|dead)_fraction$"]],
        "non-finite gradient values": ["Multiline", [r"^grad/.*/nonfinite$"]],
    }
    return layout


def _parameter_names(parameters: Any) -> list[str]:
    """``parameters`` (any iterable of names) as a list; MonitorError, in one line, for anything
    else (a model, ``named_parameters()``'s pairs, one string), which would fail deep inside."""
    try:
        names = None if isinstance(parameters, (str, bytes)) else list(parameters)
    except TypeError:  # not iterable
        names = None
    if names is None or not all(isinstance(name, str) for name in names):
        got = type(parameters).__name__ if names is None else \
            f"{type(parameters).__name__} holding {type(next(n for n in names if not isinstance(n, str))).__name__}"
        raise MonitorError(f"parameters must be a list of parameter names (monitor.names, or "
                           f"[name for name, _ in model.named_parameters()]), got {got}")
    return names


def write_custom_scalars(writer: Any, parameters: Sequence[str],
                         first: Mapping[str, Mapping[str, list]] | None = None) -> dict[str, dict[str, list]]:
    """Give ``writer``'s run a Custom Scalars tab laid out by ``custom_scalars_layout`` and return
    the layout. ``writer``: a ``SummaryWriter`` (anything with ``add_custom_scalars``); call it
    once per run, before or after training. MonitorError for a writer without it, or for
    ``parameters`` that are not a list of names (``monitor.names``).

    Example:
        >>> with SummaryWriter("runs/mine") as writer, GradientMonitor(model, writer) as monitor:  # doctest: +SKIP
        ...     write_custom_scalars(writer, monitor.names)
    """
    add = getattr(writer, "add_custom_scalars", None)
    if not callable(add):
        raise MonitorError(f"write_custom_scalars needs a torch SummaryWriter (add_custom_scalars), "
                           f"got {type(writer).__module__}.{type(writer).__qualname__}")
    layout = custom_scalars_layout(parameters, first)
    add(layout)
    return layout
