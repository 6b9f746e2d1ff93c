"""Small statistic functions the monitor runs on the device, and their host-side readers.

Histograms use fixed bins read straight from a float32's bits: the sign and the 8-bit
exponent (``bits >> 23``) give 512 bins, one per octave of |g| and sign. One integer pass and
one ``bincount`` cover any tensor, so histograms of every step can be summed over a window
without sampling, and two bins come for free: exponent 0 holds exact zeros (and subnormals,
|g| < 1.2e-38) and exponent 255 holds Inf and NaN, which are counted and never plotted.

Example:
    >>> g = torch.tensor([0.0, 1.0, -3.0, float("nan")])
    >>> counts = sign_exponent_counts(g)
    >>> zero_count(counts), nonfinite_count(counts)
    (1, 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

EXPONENTS = 256                  # values of a float32's biased exponent field
SIGN_EXPONENT_BINS = 2 * EXPONENTS
ZERO_EXPONENT = 0                # exact zeros and subnormals
NONFINITE_EXPONENT = 255         # Inf and NaN
LOG10_2 = math.log10(2.0)


@dataclass(frozen=True)
class Histogram:
    """A bucketed histogram: right edges of the buckets and their counts."""

    limits: list[float]
    counts: list[float]


def sign_exponent_bins(flat: torch.Tensor) -> torch.Tensor:
    """Bin index in [0, 512) of each element: sign * 256 + biased exponent."""
    if flat.dtype != torch.float32:
        flat = flat.float()
    return ((flat.view(torch.int32) >> 23) & (SIGN_EXPONENT_BINS - 1)).long()


def count_into(counts: torch.Tensor, index: torch.Tensor) -> None:
    """Add one to ``counts[i]`` for every i in ``index``, without a host sync.

    ``bincount`` is fastest on the CPU, but on CUDA it reads the index's maximum back to the
    host; ``index_add_`` has a fixed output size and never syncs.
    """
    if counts.device.type == "cpu":
        counts.add_(torch.bincount(index, minlength=counts.numel()))
    else:
        counts.index_add_(0, index, torch.ones_like(index, dtype=counts.dtype))


def sign_exponent_counts(tensor: torch.Tensor) -> torch.Tensor:
    """The 512-bin sign/exponent histogram of one tensor (int64 counts)."""
    counts = torch.zeros(SIGN_EXPONENT_BINS, dtype=torch.int64, device=tensor.device)
    count_into(counts, sign_exponent_bins(tensor.detach().reshape(-1)))
    return counts


def _by_sign(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return counts[..., :EXPONENTS], counts[..., EXPONENTS:]


def zero_count(counts) -> int:
    positive, negative = _by_sign(np.asarray(counts))
    return int(positive[..., ZERO_EXPONENT].sum() + negative[..., ZERO_EXPONENT].sum())


def nonfinite_count(counts) -> int:
    positive, negative = _by_sign(np.asarray(counts))
    return int(positive[..., NONFINITE_EXPONENT].sum() + negative[..., NONFINITE_EXPONENT].sum())


def _octave_edge(exponent: int) -> float:
    """Upper edge of the octave of a biased exponent: |x| < 2 ** (exponent - 126)."""
    return math.ldexp(1.0, int(exponent) - 126)


_FINITE = np.arange(ZERO_EXPONENT + 1, NONFINITE_EXPONENT)                # exponents 1..254
# Value buckets run from the most negative octave through zero to the most positive one.
VALUE_LIMITS = np.array([-_octave_edge(e - 1) for e in _FINITE[::-1]] + [_octave_edge(ZERO_EXPONENT)]
                        + [_octave_edge(e) for e in _FINITE])
LOG10_LIMITS = (_FINITE - 126) * LOG10_2


def value_histogram(counts, octaves: int = 24) -> tuple[list[float], list[float]] | None:
    """TensorBoard bucket limits (right edges) and counts of the finite values, or None.

    Values more than ``octaves`` octaves below the largest magnitude join the bucket around
    zero (invisible on a linear axis anyway), so a window that holds exact zeros does not
    spend 250 buckets on empty octaves. Returns None when no finite value was seen.
    """
    positive, negative = _by_sign(np.asarray(counts, dtype=np.float64))
    seen = np.flatnonzero(positive[_FINITE] + negative[_FINITE])
    zeros = positive[ZERO_EXPONENT] + negative[ZERO_EXPONENT]
    if seen.size == 0 and zeros == 0:
        return None
    floor = int(max(1, _FINITE[seen[-1]] - octaves)) if seen.size else 1
    ordered = np.concatenate([negative[_FINITE[::-1]], [zeros], positive[_FINITE]])
    middle = len(_FINITE)                                  # index of the zero bucket
    low, high = middle + 1 - floor, middle + floor         # octaves below the floor, both signs
    merged = np.concatenate([ordered[:low], [ordered[low:high].sum()], ordered[high:]])
    limits = np.concatenate([VALUE_LIMITS[:low], [VALUE_LIMITS[high - 1]], VALUE_LIMITS[high:]])
    return _trim(limits, merged)


def log10_abs_histogram(counts) -> tuple[list[float], list[float]] | None:
    """Bucket limits and counts of log10 |x| over finite non-zero values, or None."""
    positive, negative = _by_sign(np.asarray(counts, dtype=np.float64))
    return _trim(LOG10_LIMITS, positive[_FINITE] + negative[_FINITE])


def _trim(limits: np.ndarray, values: np.ndarray) -> tuple[list[float], list[float]] | None:
    nonempty = np.flatnonzero(values)
    if nonempty.size == 0:
        return None
    # Keep one empty bucket on the left so TensorBoard knows where the first one starts.
    first, last = max(nonempty[0] - 1, 0), nonempty[-1]
    return limits[first:last + 1].tolist(), values[first:last + 1].tolist()


def histogram_moments(limits: list[float], values: list[float]) -> tuple[float, float, float, float, float]:
    """min, max, count, sum and sum of squares of a bucketed histogram, at bucket centres.

    TensorBoard's histogram record carries these; the exact moments of a window that held a
    NaN would be NaN, so they are estimated from the finite buckets instead.
    """
    edges = np.asarray(limits, dtype=np.float64)
    counts = np.asarray(values, dtype=np.float64)
    lefts = np.concatenate([[edges[0] - abs(edges[0])], edges[:-1]]) if len(edges) else edges
    centres = (lefts + edges) / 2
    nonempty = counts > 0
    return (
        float(lefts[nonempty][0]),
        float(edges[nonempty][-1]),
        float(counts.sum()),
        float((counts * centres).sum()),
        float((counts * centres**2).sum()),
    )
