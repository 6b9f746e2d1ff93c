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
    ordered = np.empty(2 * FINITE + 1)
    row_limits = np.empty(2 * FINITE + 1)
    row_counts = np.empty(2 * FINITE + 1)
    at = 0
    for r in range(rows):
        offsets[r] = at
        source = index[r]
        zeros = np.float64(counts[source, 0] + counts[source, 256])
        largest = -1
        for j in range(FINITE):                  # exponent j + 1
            negative, positive = np.float64(counts[source, 1 + j]), np.float64(counts[source, 257 + j])
            ordered[MIDDLE - 1 - j] = negative
            ordered[MIDDLE + 1 + j] = positive
            if negative + positive > 0:
                largest = j
        ordered[MIDDLE] = zeros
        floor = max(1, largest + 1 - octaves) if largest >= 0 else 1
        first, last, total, total_sum, squares = -1, -1, 0.0, 0.0, 0.0
        for i in range(2 * FINITE + 1):
            c = ordered[i]
            if c > 0:
                if first < 0:
                    first = i
                last = i
            total += c
            if abs(i - MIDDLE) >= floor:         # octaves below the floor sit at the zero bucket's centre, 0
                total_sum += c * value_centres[i]
                squares += c * value_centres[i] * value_centres[i]
        if total == 0:
            valid[r] = False
            continue
        valid[r] = True
        if abs(first - MIDDLE) < floor:
            first = MIDDLE
        if abs(last - MIDDLE) < floor:
            last = MIDDLE
        right_of_zero = value_limits[MIDDLE + floor - 1]
        middle = zeros
        for e in range(1, floor):
            middle += ordered[MIDDLE - e] + ordered[MIDDLE + e]
        n = 0
        for i in range(first, min(last, MIDDLE - floor) + 1):
            row_limits[n], row_counts[n] = value_limits[i], ordered[i]
            n += 1
        if first <= MIDDLE <= last:
            row_limits[n], row_counts[n] = right_of_zero, middle
            n += 1
        for i in range(max(first, MIDDLE + floor), last + 1):
            row_limits[n], row_counts[n] = value_limits[i], ordered[i]
            n += 1
        at = _emit(row_limits, row_counts, n, limits_out, counts_out, at)
        moments[r, 0] = -right_of_zero if first == MIDDLE else value_lefts[first]
        moments[r, 1] = right_of_zero if last == MIDDLE else value_limits[last]
        moments[r, 2], moments[r, 3], moments[r, 4] = total, total_sum, squares
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
        source = index[r]
        first, last, total, total_sum, squares = -1, -1, 0.0, 0.0, 0.0
        for j in range(FINITE):
            c = np.float64(counts[source, 1 + j] + counts[source, 257 + j])
            magnitudes[j] = c
            if c > 0:
                if first < 0:
                    first = j
                last = j
            total += c
            total_sum += c * log10_centres[j]
            squares += c * log10_centres[j] * log10_centres[j]
        if total == 0:
            valid[r] = False
            continue
        valid[r] = True
        at = _emit(log10_limits[first:last + 1], magnitudes[first:last + 1], last + 1 - first, limits_out, counts_out, at)
        moments[r, 0], moments[r, 1] = log10_lefts[first], log10_limits[last]
        moments[r, 2], moments[r, 3], moments[r, 4] = total, total_sum, squares
    offsets[rows] = at
