"""A window's TensorBoard ``Event`` as bytes, encoded by hand: the bytes ``Event.SerializeToString()``
gives for the same content, without building the protobuf message.

Why: ``TensorBoardSink`` used to fill a upb ``Event`` (140 scalars through a refilled template and
``MergeFrom``, 41 histograms field by field, bucket lists ``extend``-ed) and serialize it. On the
tutorial's MLP, in its monitored loop (one window per 16 steps, each variant timed at alternate
windows), filling and serializing cost 121-124 us a window and these bytes 55-76 us (in
isolation, warm: 107 against 34 us); the sink's whole ``log`` went from 156-168 to 99-113 us. The
scalars are one template with their float32 values scattered in; each histogram is one
``struct`` call (a cached ``Struct`` per bucket count).

The wire format (https://protobuf.dev/programming-guides/encoding/), for the fields written here;
the messages are TensorBoard's ``tensorboard/compat/proto/event.proto`` and ``summary.proto``:

- ``Event``: ``wall_time`` = 1 (double, tag byte 0x09), ``step`` = 2 (int64 varint, 0x10),
  ``summary`` = 5 (message, 0x2a).
- ``Summary``: ``value`` = 1 (repeated message, 0x0a).
- ``Summary.Value``: ``tag`` = 1 (string, 0x0a), ``simple_value`` = 2 (float, 0x15), ``histo`` = 5
  (``HistogramProto``, 0x2a).
- ``HistogramProto``: ``min``, ``max``, ``num``, ``sum``, ``sum_squares`` = 1..5 (double, 0x09,
  0x11, 0x19, 0x21, 0x29); ``bucket_limit`` = 6 and ``bucket`` = 7 (packed repeated double, 0x32,
  0x3a).

Proto3 leaves a field at its default out, as upb does (tests/monitor/test_event_encoding.py checks
each against ``SerializeToString()``): a double whose bits are all zero (+0.0; -0.0 and NaN are
written), step 0, an empty tag, an empty bucket list. ``simple_value`` is in a ``oneof``, so it is
written even at 0.0. Fields go in field-number order; a float32 is the double rounded to nearest
(1e300 -> inf), as upb's C cast does; a negative step is its 64-bit two's complement (10 bytes).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Mapping, Sequence

import numpy as np

from gradflow.monitor.histograms import BuiltHistograms
from gradflow.monitor.stats import Histogram, drawn_buckets

_DOUBLE = struct.Struct("<d")
_ZERO = _DOUBLE.pack(0.0)
_INT64 = 1 << 64
_ONE_BYTE = [bytes((i,)) for i in range(256)]       # a varint below 128, a tag byte
_NUMBER_TAGS = (b"\x09", b"\x11", b"\x19", b"\x21", b"\x29")      # HistogramProto's min, max, num, sum, sum_squares
_FIVE_DOUBLES = struct.Struct("<dBdBdBdBd")   # min, then max, num, sum, sum_squares each after its tag byte
STRUCT_BUCKETS = 64      # histograms of up to this many buckets are packed by one cached Struct per count


def varint(number: int) -> bytes:
    """``number`` (0 <= number < 2**64) as a protobuf base-128 varint, low 7 bits first."""
    if number < 0x80:
        return _ONE_BYTE[number]
    if number < 0x4000:
        return bytes((number & 0x7F | 0x80, number >> 7))
    out = bytearray()
    while number > 0x7F:
        out.append(number & 0x7F | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def field(tag_byte: int, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte, the payload's length as a varint, the payload."""
    return _ONE_BYTE[tag_byte] + varint(len(payload)) + payload


def double(tag_byte: int, number: float) -> bytes:
    """A double field, or nothing where its bits are all zero (+0.0, proto3's default)."""
    packed = _DOUBLE.pack(number)
    return b"" if packed == _ZERO else _ONE_BYTE[tag_byte] + packed


def packed_doubles(tag_byte: int, numbers: Sequence[float]) -> bytes:
    """A packed repeated double field (little-endian float64s), or nothing for an empty list."""
    return field(tag_byte, array("d", numbers).tobytes()) if len(numbers) else b""


def tag_field(tag: str) -> bytes:
    """``Summary.Value.tag`` (UTF-8), or nothing for "" (proto3's default)."""
    return field(0x0A, tag.encode()) if tag else b""


def event_head(wall_time: float, step: int, summary_size: int) -> bytes:
    """A serialized ``Event``'s bytes before its ``Summary`` of ``summary_size`` bytes: the
    event is these bytes followed by the summary's.

    ``step`` must fit an int64 (ValueError otherwise, as upb's ``Event.step = ...`` raises);
    a negative step is written as its two's complement."""
    step = int(step)
    if not -(1 << 63) <= step < 1 << 63:
        raise ValueError(f"step {step} is out of range: TensorBoard's Event.step is an int64 (-2**63 <= step < 2**63)")
    return b"".join((double(0x09, wall_time), b"\x10" + varint(step % _INT64) if step else b"",
                     b"\x2a", varint(summary_size)))


def event_bytes(wall_time: float, step: int, summary: bytes) -> bytes:
    """A serialized ``Event`` holding ``summary`` (a serialized ``Summary``: its values' fields)
    at ``wall_time`` (seconds since the epoch) and ``step`` (``event_head``)."""
    return event_head(wall_time, step, len(summary)) + summary


def histogram_value(tag: str, limits: Sequence[float], counts: Sequence[float], h: Histogram) -> bytes:
    """A ``Summary.Value`` field (its 0x0a tag byte and length included) of ``tag`` and ``h``'s
    five numbers with these buckets, written field by field: any histogram (zeros, empty bucket
    lists, limits and counts of different lengths); ``HistogramEncoder`` is the fast path."""
    numbers = map(_DOUBLE.pack, (h.min, h.max, h.num, h.sum, h.sum_squares))
    histo = b"".join([*(tag_byte + packed for tag_byte, packed in zip(_NUMBER_TAGS, numbers) if packed != _ZERO),
                      packed_doubles(0x32, limits), packed_doubles(0x3A, counts)])
    return field(0x0A, tag_field(tag) + field(0x2A, histo))


class ScalarValues:
    """The ``Summary.Value`` fields of a window's scalars, one per tag in order: the bytes made once
    for these tags (each value 0.0), each window's float32 values scattered into a copy of them.

    Args:
        tags: the scalars' tags (str), in the order their values will come.
    """

    def __init__(self, tags: Sequence[str]) -> None:
        parts, slots, at = [], [], 0
        for tag in tags:
            value = field(0x0A, tag_field(tag) + b"\x15\x00\x00\x00\x00")
            parts.append(value)
            at += len(value)
            slots.append(at - 4)              # the float32 is the value's last 4 bytes
        self.tags = tuple(tags)
        self._template = np.frombuffer(b"".join(parts), np.uint8)
        self._index = (np.array(slots, np.intp)[:, None] + np.arange(4)).ravel()

    def encode(self, numbers: Sequence[float] | Mapping) -> bytes:
        """The fields with these values (floats, one per tag; a dict's ``values()`` will do),
        each rounded to float32 as upb does: beyond float32's range is +-inf, with no warning."""
        values = array("f", numbers if type(numbers) is list else list(numbers))  # C's (float) cast, as upb's:
        # no overflow error or warning (a list converts in 3 us for 140, an iterable in 5)
        if len(values) != len(self.tags):
            raise ValueError(f"{len(values)} scalar values for {len(self.tags)} tags")
        out = self._template.copy()
        out[self._index] = np.frombuffer(values, np.uint8)
        return out.tobytes()


class HistogramEncoder:
    """Each histogram's ``Summary.Value`` field, in one ``struct`` call where it can be: the bytes
    before its first number (value, tag and histogram headers) kept per tag for its bucket count,
    one ``Struct`` per bucket count up to ``STRUCT_BUCKETS``. Histograms with a number that is
    +0.0 or -0.0, no buckets, limits and counts of different lengths go field by field."""

    def __init__(self) -> None:
        self._heads: dict[str, tuple] = {}        # tag -> (bucket count, head bytes, pack, limits' and counts' headers)
        self._tag_fields: tuple | None = None      # the last BuiltHistograms' tags, their fields joined, offsets
        self._packs: dict[int, object] = {}       # bucket count -> Struct.pack

    def encode(self, histograms: Mapping[str, Histogram]) -> list[bytes]:
        """The fields of ``histograms`` (tag -> Histogram), in order, as pieces to join; a histogram not marked
        ``sparse`` loses its runs of empty buckets first (``stats.drawn_buckets``), as TensorBoard gets it.
        A ``histograms.BuiltHistograms``' rows are written by one kernel call from its arrays (``_encode_built``)."""
        if isinstance(histograms, BuiltHistograms):
            return [self._encode_built(histograms), *self.encode(histograms.extra)]
        if len(self._heads) > 4 * len(histograms) + 256:      # tags of windows long gone
            self._heads.clear()
        out = []
        append = out.append
        heads = self._heads
        for tag, h in histograms.items():
            limits, counts = drawn_buckets(h)
            n = len(limits)
            lo, hi, num, total, squares = h.min, h.max, h.num, h.sum, h.sum_squares
            if not (lo and hi and num and total and squares and n == len(counts) and n > 0):
                append(histogram_value(tag, limits, counts, h))
                continue
            head = heads.get(tag)
            if head is None or head[0] != n:
                head = heads[tag] = self._head(tag, n)
            append(head[1])
            if n <= STRUCT_BUCKETS:
                append(head[2](lo, 0x11, hi, 0x19, num, 0x21, total, 0x29, squares, head[3], *limits, head[4], *counts))
            else:
                append(b"".join((_FIVE_DOUBLES.pack(lo, 0x11, hi, 0x19, num, 0x21, total, 0x29, squares),
                                 head[3], array("d", limits).tobytes(), head[4], array("d", counts).tobytes())))
        return out

    def _encode_built(self, built: BuiltHistograms) -> bytes:
        """The fields of ``built``'s rows (not its ``extra``), written by
        ``histogram_kernels.encode_values``: the bytes ``encode`` gives for ``built.as_dict()``'s
        rows, without making a ``Histogram`` or a Python float."""
        from gradflow.monitor.histogram_kernels import encode_values

        tags = built.tags
        if self._tag_fields is None or self._tag_fields[0] != tags:
            fields = [tag_field(tag) for tag in tags]
            self._tag_fields = (list(tags), np.frombuffer(b"".join(fields), np.uint8),
                                np.cumsum([0, *map(len, fields)], dtype=np.int64))
        _, tag_fields, tag_offsets = self._tag_fields
        rows = built.rows
        buckets = sum(int(ends[-1]) for _, _, ends, _, _ in rows.chunks)
        # per row at most: two tag bytes and two 10-byte varints, the tag field, five tagged doubles,
        # two list headers (a tag byte and a varint each), 16 bytes a bucket
        out = np.empty(tag_fields.size + len(tags) * (2 + 20 + 45 + 22) + 16 * buckets, np.uint8)
        at = 0
        for start, _, ends, limits, counts in rows.chunks:
            at = encode_values(tag_fields, tag_offsets, start, ends, limits, counts, rows.moments, rows.valid, out, at)
        return out[:at].tobytes()

    def _head(self, tag: str, n: int) -> tuple:
        """(n, the value's bytes up to its first number, the pack for n buckets, the two list headers)."""
        limits_head, counts_head = b"\x32" + varint(8 * n), b"\x3a" + varint(8 * n)
        histo_size = 45 + len(limits_head) + len(counts_head) + 16 * n     # five tagged doubles, two lists
        inner_head = tag_field(tag) + b"\x2a" + varint(histo_size)
        head = b"\x0a" + varint(len(inner_head) + histo_size) + inner_head + b"\x09"
        pack = None
        if n <= STRUCT_BUCKETS:
            pack = self._packs.get(n)
            if pack is None:
                size = len(limits_head)
                pack = self._packs[n] = struct.Struct(f"<dBdBdBdBd{size}s{n}d{size}s{n}d").pack
        return n, head, pack, limits_head, counts_head


class SummaryEncoder:
    """A window's serialized ``Summary``: its scalars' values (``ScalarValues``, made again when
    the tags change), then its histograms' (``HistogramEncoder``), as the sink's upb ``Event``
    held them. What it keeps between windows: the last scalar tags' template (replaced whole when
    they change, never edited) and per-tag headers made from a tag and a bucket count alone;
    ``TensorBoardSink`` still encodes one window at a time under its lock.

    Example:
        >>> from tensorboard.compat.proto.summary_pb2 import Summary
        >>> data = SummaryEncoder().encode({"loss": 0.5}, {})
        >>> data == Summary(value=[Summary.Value(tag="loss", simple_value=0.5)]).SerializeToString()
        True
    """

    def __init__(self) -> None:
        self._scalars: ScalarValues | None = None      # the last window's scalar tags' fields
        self._histograms = HistogramEncoder()

    def encode(self, scalars: Mapping[str, float], histograms: Mapping[str, Histogram]) -> bytes:
        """The ``Summary`` of ``scalars`` (tag -> float) then ``histograms`` (tag -> Histogram)."""
        parts = self._histograms.encode(histograms)
        if scalars:
            tags, values = tuple(scalars), self._scalars
            if values is None or values.tags != tags:
                values = self._scalars = ScalarValues(tags)
            parts.insert(0, values.encode(list(scalars.values())))
        return b"".join(parts)
