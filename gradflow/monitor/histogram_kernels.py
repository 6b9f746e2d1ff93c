"""Fused CPU kernels (numba) that turn rows of sign/exponent counts into TensorBoard histograms.

``stats.value_histograms`` and ``stats.log10_abs_histograms`` are the definitions; these kernels
compute the same histograms row by row in one compiled pass, and drop the runs of empty buckets
that TensorBoard does not need (``sinks.sparse_buckets``) on the way. A window of the tutorial's
MLP asks for about forty histograms: the numpy path spent 9 us a row in Python (slices, lists,
the sparse filter), more than the rest of the window's read-back; here a row costs one slice of
two lists.

Output, for R rows: flat ``limits`` and ``counts`` (each row's buckets one after another, row r
from ``offsets[r]`` to ``offsets[r + 1]``), ``moments`` (R, 5) = min, max, num, sum, sum of
squares, and ``valid`` (R,): False where a row has no finite value (no histogram).
"""

from __future__ import annotations

import numpy as np
from numba import njit

FINITE = 254                     # finite non-zero exponents 1..254
MIDDLE = FINITE                  # the zero bucket's index in the value ordering (negatives, zero, positives)


@njit(nogil=True, boundscheck=False, cache=True)
def _keep(counts, n, k):
    """Whether bucket k of n is kept: nonempty, or beside a nonempty one (``sinks.sparse_buckets``)."""
    return counts[k] != 0 or (k > 0 and counts[k - 1] != 0) or (k + 1 < n and counts[k + 1] != 0)


@njit(nogil=True, boundscheck=False, cache=True)
def _emit(limits, counts, n, limits_out, counts_out, at):
    """Append the kept buckets of (limits, counts)[:n] at ``at``; return the new end."""
    for k in range(n):
        if _keep(counts, n, k):
            limits_out[at] = limits[k]
            counts_out[at] = counts[k]
            at += 1
    return at


@njit(nogil=True, boundscheck=False, cache=True)
def value_rows(counts, index, octaves, value_limits, value_lefts, value_centres, limits_out, counts_out, offsets,
               moments, valid):
    """``stats.value_histograms`` of rows ``index`` (R,) of (N, 512) ``counts`` (int64 or float64;
    layout of stats.py: negatives' exponents 0..255, then positives'), sparse; outputs as in the
    module docstring (``limits_out`` and ``counts_out`` hold R * 509 values at most)."""
    rows = index.size
    scratch = np.empty((3, 2 * FINITE + 1))
    at = 0
    for r in range(rows):
        offsets[r] = at
        at = _value_row(counts[index[r]], octaves, value_limits, value_lefts, value_centres, scratch, limits_out,
                        counts_out, at, moments[r], valid, r)
    offsets[rows] = at


@njit(nogil=True, boundscheck=False, cache=True)
def log10_rows(counts, index, log10_limits, log10_centres, log10_lefts, limits_out, counts_out, offsets, moments,
               valid):
    """``stats.log10_abs_histograms`` of rows ``index`` (R,) of (N, 512) ``counts`` (int64 or
    float64), sparse (``log10_lefts``: each bucket's left edge, the histogram's min where it comes first)."""
    rows = index.size
    magnitudes = np.empty(FINITE)
    at = 0
    for r in range(rows):
        offsets[r] = at
        at = _log10_row(counts[index[r]], log10_limits, log10_centres, log10_lefts, magnitudes, limits_out,
                        counts_out, at, moments[r], valid, r)
    offsets[rows] = at


@njit(nogil=True, boundscheck=False, cache=True)
def mixed_rows(t0, t1, t2, t3, table, index, log10, start, octaves, value_limits, value_lefts, value_centres,
               log10_limits, log10_centres, log10_lefts, limits_out, counts_out, offsets, moments, valid):
    """Value and log10 histograms (``value_rows``, ``log10_rows``) of rows from up to four tables
    of one dtype in one call: row r is row ``index[r]`` of table ``table[r]`` (0..3: ``t0``..``t3``),
    a log10 histogram where ``log10[r]``. Rows from ``start`` on, until ``limits_out`` and
    ``counts_out`` may not hold the next row's 509 buckets: returns the row it stopped at (R when
    done), with that row's ``offsets`` entry the end of what was written. Offsets restart at 0 at
    ``start``; ``moments`` and ``valid`` are indexed by row."""
    rows = index.size
    scratch = np.empty((3, 2 * FINITE + 1))
    capacity = limits_out.size
    at = 0
    for r in range(start, rows):
        offsets[r] = at
        if at + 2 * FINITE + 1 > capacity:
            return r
        which, source = table[r], index[r]
        if which == 0:
            counts = t0[source]
        elif which == 1:
            counts = t1[source]
        elif which == 2:
            counts = t2[source]
        else:
            counts = t3[source]
        if log10[r]:
            at = _log10_row(counts, log10_limits, log10_centres, log10_lefts, scratch[0], limits_out, counts_out,
                            at, moments[r], valid, r)
        else:
            at = _value_row(counts, octaves, value_limits, value_lefts, value_centres, scratch, limits_out,
                            counts_out, at, moments[r], valid, r)
    offsets[rows] = at
    return rows


@njit(nogil=True, boundscheck=False, cache=True)
def _finite_range(counts):
    """(lowest, highest) j with a count at exponent j + 1 of either sign; (FINITE, -1) if none."""
    low = 0
    while low < FINITE and counts[1 + low] == 0 and counts[257 + low] == 0:
        low += 1
    if low == FINITE:
        return low, -1
    high = FINITE - 1
    while counts[1 + high] == 0 and counts[257 + high] == 0:
        high -= 1
    return low, high


@njit(nogil=True, boundscheck=False, cache=True)
def _ordered(counts, i):
    """Bucket i of the value ordering (negatives' exponents 254..1, zeros, positives' 1..254)."""
    if i < MIDDLE:
        return np.float64(counts[MIDDLE - i])
    if i == MIDDLE:
        return np.float64(counts[0] + counts[256])
    return np.float64(counts[256 + i - MIDDLE])


@njit(nogil=True, boundscheck=False, cache=True, inline="always")
def _add_bucket(sums, c, i, centred, value_centres):
    """``sums`` (first, last, total, sum, sum of squares) with value bucket ``i`` of count ``c``
    added; ``centred``: the bucket is at or above the floor (below it, its values sit at 0)."""
    first, last, total, total_sum, squares = sums
    if c > 0:
        if first < 0:
            first = i
        last = i
    total += c
    if centred:
        total_sum += c * value_centres[i]
        squares += c * value_centres[i] * value_centres[i]
    return first, last, total, total_sum, squares


@njit(nogil=True, boundscheck=False, cache=True)
def _value_row(counts, octaves, value_limits, value_lefts, value_centres, scratch, limits_out, counts_out, at,
               moments, valid, r):
    """One row of ``value_rows`` (``counts``: its 512 counts; ``scratch``: (3, 509)); returns the new end.

    Visits only the exponents from the lowest to the highest with a count: an empty bucket
    adds an exact 0 to every sum, so the sums, taken in the buckets' order, are those of all 509."""
    row_limits, row_counts = scratch[1], scratch[2]
    zeros = np.float64(counts[0] + counts[256])
    low, largest = _finite_range(counts)
    floor = max(1, largest + 1 - octaves) if largest >= 0 else 1
    sums = (-1, -1, 0.0, 0.0, 0.0)                 # first, last, total, sum, sum of squares
    for j in range(largest, low - 1, -1):          # negatives, bucket MIDDLE - 1 - j
        sums = _add_bucket(sums, np.float64(counts[1 + j]), MIDDLE - 1 - j, j + 1 >= floor, value_centres)
    first, last, total, total_sum, squares = sums
    if zeros > 0:
        if first < 0:
            first = MIDDLE
        last = MIDDLE
    total += zeros
    sums = (first, last, total, total_sum, squares)
    for j in range(low, largest + 1):              # positives, bucket MIDDLE + 1 + j
        sums = _add_bucket(sums, np.float64(counts[257 + j]), MIDDLE + 1 + j, j + 1 >= floor, value_centres)
    first, last, total, total_sum, squares = sums
    if total == 0:
        valid[r] = False
        return at
    valid[r] = True
    if abs(first - MIDDLE) < floor:
        first = MIDDLE
    if abs(last - MIDDLE) < floor:
        last = MIDDLE
    right_of_zero = value_limits[MIDDLE + floor - 1]
    middle = zeros
    for e in range(max(1, low + 1), floor):
        middle += np.float64(counts[e]) + np.float64(counts[256 + e])
    n = 0
    for i in range(first, min(last, MIDDLE - floor) + 1):
        row_limits[n], row_counts[n] = value_limits[i], _ordered(counts, i)
        n += 1
    if first <= MIDDLE <= last:
        row_limits[n], row_counts[n] = right_of_zero, middle
        n += 1
    for i in range(max(first, MIDDLE + floor), last + 1):
        row_limits[n], row_counts[n] = value_limits[i], _ordered(counts, i)
        n += 1
    at = _emit(row_limits, row_counts, n, limits_out, counts_out, at)
    moments[0] = -right_of_zero if first == MIDDLE else value_lefts[first]
    moments[1] = right_of_zero if last == MIDDLE else value_limits[last]
    moments[2], moments[3], moments[4] = total, total_sum, squares
    return at


@njit(nogil=True, boundscheck=False, cache=True)
def _log10_row(counts, log10_limits, log10_centres, log10_lefts, magnitudes, limits_out, counts_out, at, moments,
               valid, r):
    """One row of ``log10_rows`` (``magnitudes``: 254 values of scratch); returns the new end.
    Visits the exponents with a count only, as ``_value_row``."""
    first, last = _finite_range(counts)
    if last < 0:
        valid[r] = False
        return at
    total, total_sum, squares = 0.0, 0.0, 0.0
    for j in range(first, last + 1):
        c = np.float64(counts[1 + j] + counts[257 + j])
        magnitudes[j] = c
        total += c
        total_sum += c * log10_centres[j]
        squares += c * log10_centres[j] * log10_centres[j]
    valid[r] = True
    at = _emit(log10_limits[first:last + 1], magnitudes[first:last + 1], last + 1 - first, limits_out, counts_out, at)
    moments[0], moments[1] = log10_lefts[first], log10_limits[last]
    moments[2], moments[3], moments[4] = total, total_sum, squares
    return at


# -- encoding: the rows as TensorBoard ``Summary.Value`` fields (event_encoding) --------------

@njit(nogil=True, boundscheck=False, cache=True, inline="always")
def _varint_size(number):
    size = 1
    while number > 0x7F:
        number >>= 7
        size += 1
    return size


@njit(nogil=True, boundscheck=False, cache=True, inline="always")
def _put_varint(out, at, number):
    while number > 0x7F:
        out[at] = (number & 0x7F) | 0x80
        number >>= 7
        at += 1
    out[at] = number
    return at + 1


@njit(nogil=True, boundscheck=False, cache=True, inline="always")
def _put_bytes(out, at, source, start, stop):
    for i in range(start, stop):
        out[at] = source[i]
        at += 1
    return at


@njit(nogil=True, boundscheck=False, cache=True)
def encode_values(tag_fields, tag_offsets, first, ends, limits, counts, moments, valid, out, at):
    """Write rows ``first`` .. ``first + ends.size - 2`` of a ``BuiltRows`` chunk (``ends``: its
    offsets into ``limits`` and ``counts``, float64) as ``Summary.Value`` fields with a
    ``HistogramProto``, each in the bytes ``event_encoding.histogram_value`` gives (and upb's
    ``SerializeToString``), into the uint8 ``out`` from ``at``; returns the new end. Row r's tag
    field (``event_encoding.tag_field``) is ``tag_fields[tag_offsets[r]:tag_offsets[r + 1]]``;
    ``moments`` (R, 5) float64, ``valid`` (R,): a row not valid is left out. A number whose bits
    are all zero (+0.0) is left out, as proto3 leaves a default; -0.0 and NaN are written."""
    number_bits = moments.reshape(-1).view(np.int64)
    number_bytes = moments.reshape(-1).view(np.uint8)
    limit_bytes = limits.view(np.uint8)
    count_bytes = counts.view(np.uint8)
    for k in range(ends.size - 1):
        r = first + k
        if not valid[r]:
            continue
        a, n = ends[k], ends[k + 1] - ends[k]
        histo = 0
        for j in range(5):
            if number_bits[5 * r + j] != 0:
                histo += 9
        if n > 0:
            histo += 2 * (1 + _varint_size(8 * n) + 8 * n)
        tag_start, tag_stop = tag_offsets[r], tag_offsets[r + 1]
        inner = tag_stop - tag_start + 1 + _varint_size(histo) + histo
        out[at] = 0x0A
        at = _put_varint(out, at + 1, inner)
        at = _put_bytes(out, at, tag_fields, tag_start, tag_stop)
        out[at] = 0x2A
        at = _put_varint(out, at + 1, histo)
        for j in range(5):                         # min, max, num, sum, sum_squares: fields 1..5, doubles
            if number_bits[5 * r + j] != 0:
                out[at] = 0x09 + 8 * j
                at = _put_bytes(out, at + 1, number_bytes, 8 * (5 * r + j), 8 * (5 * r + j + 1))
        if n > 0:                                  # bucket_limit = 6, bucket = 7: packed doubles
            out[at] = 0x32
            at = _put_varint(out, at + 1, 8 * n)
            at = _put_bytes(out, at, limit_bytes, 8 * a, 8 * (a + n))
            out[at] = 0x3A
            at = _put_varint(out, at + 1, 8 * n)
            at = _put_bytes(out, at, count_bytes, 8 * a, 8 * (a + n))
    return at
